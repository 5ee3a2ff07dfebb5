"""`qwen-edit download` against a fake Hugging Face hub on 127.0.0.1 (never the network).

The fake hub answers what huggingface_hub and the downloader ask: HEAD/GET /<repo>/resolve/<rev>/<file>
(small files directly with ETag and Content-Length; "LFS" files with a 302 to a CDN host, carrying
X-Linked-Size and X-Linked-Etag = sha256, as the real hub does), the CDN itself with HTTP ranges, and
GET /api/models/<repo>/tree/<rev>/<folder>. The CDN is addressed as `localhost` while the hub is
`127.0.0.1`, so the two are different hosts and the token must not travel to the CDN. It can cut a
transfer short, answer 503, or advertise a size its bytes don't have. The server stops itself after
a few minutes even if a test never shuts it down.

These tests run the command in a real process: huggingface_hub reads $HF_ENDPOINT and the token
settings when it is imported, so each run needs its own interpreter to meet the fake hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from twins import cli_command

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_fake_token_for_tests"
T4 = "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"
T8 = "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-8steps.safetensors"
NUNCHAKU = "nunchaku-tech/nunchaku-qwen-image-edit-2509"
COMFY = "Comfy-Org/Qwen-Image_ComfyUI"
QWEN = "Qwen/Qwen-Image-Edit-2509"


TIMEOUT = {"seconds": 600.0}  # replaced per session by conftest's subprocess_timeout (see _timeout)


@pytest.fixture(autouse=True)
def _timeout(subprocess_timeout):
    TIMEOUT["seconds"] = subprocess_timeout


def run_cli(args: list[str], cwd: Path, env: dict | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "QWEN_EDIT_"))}
    full_env.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    return subprocess.run(
        [*cli_command(), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=TIMEOUT["seconds"],
    )  # fmt: skip


def events(stdout: str) -> list[dict]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines and all(e["schema"] in ("event/1", "envelope/1") and "type" in e for e in lines)
    assert lines[-1]["type"] == "envelope" and [e["type"] for e in lines].count("envelope") == 1
    return lines


class FakeHub:
    def __init__(self):
        self.files: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.cut_after: dict[str, int] = {}  # file path -> bytes sent before the connection drops (once)
        self.unavailable: set[str] = set()  # file paths answering 503
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(300, self.server.shutdown)  # bounded even if teardown never runs

    def add(self, repo: str, path: str, content: bytes, *, lfs: bool = False, advertised: int | None = None):
        self.files[(repo, path)] = {
            "content": content,
            "lfs": lfs,
            "advertised": advertised,
            "sha256": hashlib.sha256(content).hexdigest(),
            "oid": hashlib.sha1(content).hexdigest(),
        }

    def gets(self, path_part: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "GET" and path_part in r["path"]]

    def start(self) -> FakeHub:
        self.thread.start()
        self.timer.start()
        return self

    def stop(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

            def _route(self, head: bool):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                hub.requests.append(
                    {
                        "method": self.command,
                        "path": path,
                        "host": self.headers.get("Host"),
                        "range": self.headers.get("Range"),
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    return self._tree(f"{parts[2]}/{parts[3]}", "/".join(parts[6:]))
                if parts[0] == "cdn":
                    entry = next(
                        (v | {"path": p} for (r, p), v in hub.files.items() if v["sha256"] == parts[1]), None
                    )
                    return self._bytes(entry, head) if entry else self._empty(404)
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._empty(404)
                repo, file_path = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                if not any(r == repo for r, _ in hub.files):
                    return self._empty(404, {"X-Error-Code": "RepoNotFound"})
                entry = hub.files.get((repo, file_path))
                if entry is None:
                    return self._empty(404, {"X-Error-Code": "EntryNotFound"})
                size = entry["advertised"] or len(entry["content"])
                if entry["lfs"]:
                    return self._empty(
                        302,
                        {
                            "Location": f"http://localhost:{hub.port}/cdn/{entry['sha256']}",
                            "X-Linked-Size": str(size),
                            "X-Linked-Etag": f'"{entry["sha256"]}"',
                            "ETag": f'"{entry["oid"]}"',
                            "X-Repo-Commit": COMMIT,
                        },
                    )
                return self._bytes(entry | {"path": file_path}, head)

            def _tree(self, repo: str, folder: str):
                listing = [
                    {"type": "file", "oid": v["oid"], "size": len(v["content"]), "path": p}
                    for (r, p), v in hub.files.items()
                    if r == repo and p.rsplit("/", 1)[0] == folder
                ]
                body = json.dumps(listing).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _empty(self, status: int, headers: dict | None = None):
                self.send_response(status)
                headers = {"Content-Length": "0", **(headers or {})}  # a HEAD announces the file's length
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()

            def _bytes(self, entry: dict, head: bool):
                content, name = entry["content"], entry["path"]
                advertised = entry["advertised"] or len(content)
                headers = {
                    "ETag": f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"',
                    "X-Repo-Commit": COMMIT,
                    "Accept-Ranges": "bytes",
                }
                if head:
                    return self._empty(200, headers | {"Content-Length": str(advertised)})
                if name in hub.unavailable and name not in hub.cut_after:  # a pending cut comes first
                    return self._empty(503)
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    if start >= len(content):
                        return self._empty(416, {"Content-Range": f"bytes */{len(content)}"})
                body = content[start:]
                self.send_response(206 if start else 200)
                for key, value in headers.items():
                    self.send_header(key, value)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = hub.cut_after.pop(name, None)
                if cut is not None:  # a dropped connection: fewer bytes than promised, then close
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


def content(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7) % 251 for i in range(n))


@pytest.fixture
def hub():
    hub = FakeHub()
    hub.add(NUNCHAKU, T4, content(300_000, 1), lfs=True)
    hub.add(NUNCHAKU, T8, content(280_000, 2), lfs=True)
    hub.add(NUNCHAKU, T4.replace("int4", "fp4"), content(310_000, 3), lfs=True)
    hub.add(NUNCHAKU, T8.replace("int4", "fp4"), content(290_000, 4), lfs=True)
    hub.add(
        COMFY,
        "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
        content(200_000, 5),
        lfs=True,
    )
    hub.add(COMFY, "split_files/vae/qwen_image_vae.safetensors", content(120_000, 6), lfs=True)
    hub.add(QWEN, "tokenizer/vocab.json", b'{"a": 0}' * 1000)
    hub.add(QWEN, "tokenizer/merges.txt", b"#version: 0.2\n")
    hub.add(QWEN, "tokenizer/tokenizer_config.json", b'{"tokenizer_class": "Qwen2Tokenizer"}')
    hub.add(QWEN, "transformer/config.json", b"{}")  # another folder: not fetched
    hub.start()
    yield hub
    hub.stop()


def hub_env(hub: FakeHub, tmp_path: Path) -> dict:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def int4_download_args(models: Path) -> list[str]:
    """`download` of the int4 4-step files without the tokenizer, JSON events, no retries."""
    return ["download", "--models-dir", str(models), "--precision", "int4", "--steps", "4",
            "--no-tokenizer", "--json", "--retries", "0"]  # fmt: skip


EXPECTED = {
    f"diffusion_models/{T4}": (NUNCHAKU, T4),
    f"diffusion_models/{T8}": (NUNCHAKU, T8),
    "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors": (
        COMFY,
        "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    ),
    "vae/qwen_image_vae.safetensors": (COMFY, "split_files/vae/qwen_image_vae.safetensors"),
    "text_encoders/tokenizer/vocab.json": (QWEN, "tokenizer/vocab.json"),
    "text_encoders/tokenizer/merges.txt": (QWEN, "tokenizer/merges.txt"),
    "text_encoders/tokenizer/tokenizer_config.json": (QWEN, "tokenizer/tokenizer_config.json"),
}
DEFAULT = {target: source for target, source in EXPECTED.items() if "8steps" not in target}  # no --steps


def test_dry_run_lists_the_files_and_writes_nothing(hub, tmp_path):
    models = tmp_path / "models"
    proc = run_cli(
        ["download", "--models-dir", str(models), "--precision", "int4", "--dry-run", "--json"],
        tmp_path,
        hub_env(hub, tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    lines = events(proc.stdout)
    assert [e["type"] for e in lines] == ["plan", "envelope"]
    data = lines[-1]["data"]
    assert data["dry_run"] and data["precision"] == "int4" and lines[-1]["ok"]
    files = {f["target"]: f for f in data["files"]}
    assert set(files) == set(DEFAULT)  # the 4-step transformer only, unless --steps says more
    for target, (repo, path) in DEFAULT.items():
        assert (files[target]["repo"], files[target]["path"]) == (repo, path)
        assert files[target]["size"] == len(hub.files[(repo, path)]["content"])
        assert files[target]["status"] == "would_download"
    assert data["bytes_to_fetch"] == sum(f["size"] for f in files.values())
    assert not models.exists()
    assert not hub.gets("/cdn/") and all(
        r["method"] == "HEAD" for r in hub.requests if "/resolve/" in r["path"]
    )

    human = run_cli(
        ["download", "--models-dir", str(models), "--precision", "fp4", "--steps", "8", "--dry-run"],
        tmp_path,
        hub_env(hub, tmp_path),
    )
    assert human.returncode == 0, human.stderr
    assert "svdq-fp4_r128-qwen-image-edit-2509-lightningv2.0-8steps.safetensors" in human.stdout
    assert "4steps" not in human.stdout and "to fetch" in human.stdout and not models.exists()

    both = run_cli(["download", "--models-dir", str(models), "--precision", "int4", "--steps", "4", "8",
                    "--dry-run", "--json"], tmp_path, hub_env(hub, tmp_path))  # fmt: skip
    assert both.returncode == 0, both.stderr
    assert {f["target"] for f in events(both.stdout)[-1]["data"]["files"]} == set(EXPECTED)


def test_download_into_the_comfyui_layout_then_nothing_to_do(hub, tmp_path):
    models = tmp_path / "models"
    env = hub_env(hub, tmp_path)
    args = ["download", "--models-dir", str(models), "--precision", "int4", "--steps", "4", "8", "--json"]
    proc = run_cli(args, tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    lines = events(proc.stdout)
    for target, key in EXPECTED.items():
        assert (models / target).read_bytes() == hub.files[key]["content"], target
    assert not list(models.rglob("*.part*"))
    done = {e["target"] for e in lines if e["type"] == "download_done"}
    assert done == set(EXPECTED)
    last_progress = {e["target"]: e for e in lines if e["type"] == "download_progress"}
    assert all(last_progress[t]["bytes"] == last_progress[t]["size"] for t in EXPECTED)
    # The token goes to the hub, never to the CDN host it redirects to.
    cdn = hub.gets("/cdn/")
    assert len(cdn) == 4 and all(
        r["authorization"] is None and r["host"].startswith("localhost") for r in cdn
    )
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in hub.gets("/resolve/"))
    assert lines[-1]["data"]["bytes_fetched"] == sum(len(hub.files[k]["content"]) for k in EXPECTED.values())

    # It is the layout the pipeline reads: the default settings find every file, and the tokenizer
    # folder sits where the pipeline looks for it (beside the text encoder).
    from qwen_edit.pipeline import find_tokenizer
    from qwen_edit.settings import load_settings
    from runners.cli.locations import settings_layers

    kwargs = load_settings(settings_layers(None, models)).pipeline_kwargs()
    assert Path(kwargs["transformer"]) == (models / "diffusion_models" / T4).resolve()
    assert Path(kwargs["vae"]) == (models / "vae/qwen_image_vae.safetensors").resolve()
    assert find_tokenizer(Path(kwargs["text_encoder"])) == (models / "text_encoders/tokenizer").resolve()

    hub.requests.clear()
    again = run_cli(args, tmp_path, env)
    assert again.returncode == 0, again.stderr
    skipped = [e for e in events(again.stdout) if e["type"] == "skipped"]
    assert {e["target"] for e in skipped} == set(EXPECTED)
    assert not hub.gets("/cdn/") and not hub.gets("/resolve/")  # only HEADs: nothing fetched twice


def test_an_interrupted_download_resumes(hub, tmp_path):
    models, env = tmp_path / "models", hub_env(hub, tmp_path)
    args = int4_download_args(models)
    big = hub.files[(NUNCHAKU, T4)]["content"]
    hub.cut_after[T4] = 100_000  # the connection drops, then the hub is unavailable: the run gives up
    hub.unavailable.add(T4)
    first = run_cli(args, tmp_path, env)
    assert first.returncode == 5, first.stderr
    error = events(first.stdout)[-1]["error"]
    assert error["code"] == "download_incomplete" and "resumes" in error["fix"]
    part = models / "diffusion_models" / (T4 + ".part")
    assert part.stat().st_size == 100_000 and not (models / "diffusion_models" / T4).exists()

    hub.unavailable.clear()
    hub.requests.clear()
    hub.cut_after["split_files/vae/qwen_image_vae.safetensors"] = 50_000  # dropped once: resumed in-process
    second = run_cli(args, tmp_path, env)
    assert second.returncode == 0, second.stderr
    plan = next(e for e in events(second.stdout) if e["type"] == "plan")
    status = {f["target"]: (f["status"], f["local_bytes"]) for f in plan["files"]}
    assert status[f"diffusion_models/{T4}"] == ("partial", 100_000)
    assert [r["range"] for r in hub.gets("/cdn/" + hub.files[(NUNCHAKU, T4)]["sha256"])] == ["bytes=100000-"]
    vae_sha = hub.files[(COMFY, "split_files/vae/qwen_image_vae.safetensors")]["sha256"]
    assert [r["range"] for r in hub.gets("/cdn/" + vae_sha)] == [None, "bytes=50000-"]
    assert (models / "diffusion_models" / T4).read_bytes() == big and not part.exists()
    assert (models / "vae/qwen_image_vae.safetensors").read_bytes() == hub.files[
        (COMFY, "split_files/vae/qwen_image_vae.safetensors")
    ]["content"]


def test_sizes_are_verified(hub, tmp_path):
    models, env = tmp_path / "models", hub_env(hub, tmp_path)
    vae_key = (COMFY, "split_files/vae/qwen_image_vae.safetensors")
    args = int4_download_args(models)
    # A hub whose bytes don't add up to the size it announced: refused, nothing left in place.
    hub.files[vae_key]["advertised"] = 150_000
    bad = run_cli(args, tmp_path, env)
    assert bad.returncode == 5, bad.stderr
    assert events(bad.stdout)[-1]["error"]["code"] == "size_mismatch"
    assert not (models / "vae/qwen_image_vae.safetensors").exists()
    assert not list((models / "vae").glob("*.part*"))

    # A file of the wrong size in place is fetched again; so is one of the right size but wrong bytes,
    # with --checksum (sha256 from the hub's LFS etag).
    hub.files[vae_key]["advertised"] = None
    (models / "vae/qwen_image_vae.safetensors").write_bytes(b"short")
    te = models / "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"
    te_key = (COMFY, "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors")
    te.parent.mkdir(parents=True, exist_ok=True)
    te.write_bytes(bytes(len(hub.files[te_key]["content"])))
    good = run_cli([*args, "--checksum"], tmp_path, env)
    assert good.returncode == 0, good.stderr
    lines = events(good.stdout)
    plan = {f["target"]: f["status"] for f in next(e for e in lines if e["type"] == "plan")["files"]}
    assert plan["vae/qwen_image_vae.safetensors"] == "size_mismatch"
    assert plan["text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"] == "corrupt"
    assert (models / "vae/qwen_image_vae.safetensors").read_bytes() == hub.files[vae_key]["content"]
    assert te.read_bytes() == hub.files[te_key]["content"]
    assert all(e["sha256_verified"] for e in lines if e["type"] == "download_done")


def test_hub_errors_are_reported(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    missing = run_cli(
        ["download", "--models-dir", "m", "--precision", "int4", "--rank", "32", "--dry-run", "--json"],
        tmp_path,
        env,
    )
    assert missing.returncode == 5
    error = events(missing.stdout)[-1]["error"]
    assert error["code"] == "hub_file_not_found" and "svdq-int4_r32" in error["message"]

    hub.stop()  # nothing listens on the port any more
    offline = run_cli(["download", "--models-dir", "m", "--precision", "int4", "--dry-run"], tmp_path, env)
    assert offline.returncode == 5
    assert "cannot reach" in offline.stderr and "fix:" in offline.stderr

    usage = run_cli(["download", "--rank", "64", "--json"], tmp_path, env)
    assert usage.returncode == 2 and events(usage.stdout)[-1]["error"]["code"] == "bad_parameter"


def test_precision_auto_follows_the_card(hub, tmp_path):
    from runners.cli.download import resolve_precision

    expected, _ = resolve_precision("auto")
    proc = run_cli(
        ["download", "--models-dir", "m", "--dry-run", "--json", "--steps", "4"],
        tmp_path,
        hub_env(hub, tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    data = events(proc.stdout)[-1]["data"]
    assert data["precision"] == expected and data["reason"]
    assert any(f["target"] == f"diffusion_models/{T4.replace('int4', expected)}" for f in data["files"])


@pytest.mark.parametrize(
    "kind, code",
    [
        ("OfflineModeIsEnabled", "offline"),
        ("GatedRepoError", "hub_unauthorized"),  # a RepositoryNotFoundError too: the first match must win
        ("RepositoryNotFoundError", "hub_repo_not_found"),
        ("EntryNotFoundError", "hub_file_not_found"),
        ("HfHubHTTPError", "hub_error"),
        ("ConnectionError", "network_error"),
    ],
)
def test_each_hub_failure_gets_its_code_and_a_fix(kind, code):
    from huggingface_hub import errors

    from runners.cli.download import hub_error

    cls = getattr(errors, kind, None) or ConnectionError
    exc = cls.__new__(cls)  # skip __init__: its required arguments differ between hub versions
    Exception.__init__(exc, "boom")
    error = hub_error(exc, "org/repo", "file.safetensors")
    assert error.code == code and error.fix
    assert "org/repo" in error.message
