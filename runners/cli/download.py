"""`qwen-edit download`: the model files from the Hugging Face hub into ComfyUI's `models/` layout.

What comes from where (the repositories the ComfyUI workflow's files are published in):
    nunchaku-tech/nunchaku-qwen-image-edit-2509   svdq-{int4|fp4}_r{128|32}-qwen-image-edit-2509-
                                                  lightningv2.0-{4|8}steps.safetensors -> diffusion_models/
    Comfy-Org/Qwen-Image_ComfyUI                  split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled
                                                  .safetensors -> text_encoders/
                                                  split_files/vae/qwen_image_vae.safetensors -> vae/
    Qwen/Qwen-Image-Edit-2509                     tokenizer/* -> text_encoders/tokenizer/ (beside the
                                                  encoder, where the pipeline looks for it)

huggingface_hub supplies the hub protocol: the endpoint ($HF_ENDPOINT), the token, file metadata (a
HEAD on /<repo>/resolve/<rev>/<file>: size, etag, commit) and the folder listing. The bytes themselves
are fetched here, with HTTP ranges into `<target>.part` beside the target, because hf_hub_download
(2.x) downloads into a process-unique temporary file that it deletes on failure: an interrupted
12 GB download would start over. `<target>.part.json` records the etag and size a partial file
belongs to, so a file that changed on the hub is never resumed into a mix of two versions. A finished
file is checked against the hub's size (and its sha256 with --checksum) before it is renamed into
place, so a file at a target path is always complete.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

from qwen_edit.paths import TEXT_ENCODER_FILE, TRANSFORMER_FILE, VAE_FILE

from .output import EXIT_NETWORK, EXIT_RUNTIME, EXIT_USAGE, CliError, Reporter, human_bytes

REPO_TRANSFORMER = "nunchaku-tech/nunchaku-qwen-image-edit-2509"
REPO_COMFY = "Comfy-Org/Qwen-Image_ComfyUI"
REPO_TOKENIZER = "Qwen/Qwen-Image-Edit-2509"
TOKENIZER_TARGET = "text_encoders/tokenizer"  # pipeline.find_tokenizer looks beside the encoder
TOKENIZER_REQUIRED = ("vocab.json", "merges.txt")
# Approximate sizes for planning disk space without the network (doctor). Text encoder: 9.38 GB and VAE
# ~0.25 GB, the files of Comfy-Org/Qwen-Image_ComfyUI (split_files/); transformers counted from the
# layout of nunchaku-tech/nunchaku@3a3cc3d's SVDQ checkpoints: 60 blocks at 4 bits plus scales and the
# low-rank branch (int4 r32 11.5 GB, r128 12.6 GB; fp4 about 0.4 GB more).
APPROX_BYTES = {"text_encoder": 9_380_000_000, "vae": 254_000_000, "tokenizer": 12_000_000}
CHUNK = 1 << 20
PROGRESS_EVERY_S = 0.5


def approx_transformer_bytes(precision: str, rank: int) -> int:
    base = 12_600_000_000 if rank >= 128 else 11_500_000_000
    return base + (400_000_000 if precision == "fp4" else 0)


@dataclass
class RemoteFile:
    """One file to fetch: where it is on the hub, where it goes, and (after `fetch_metadata`) its size."""

    repo: str
    path: str  # in the repository
    target: str  # relative to the models folder
    kind: str  # transformer, text_encoder, vae, tokenizer
    size: int | None = None
    etag: str | None = None
    commit: str | None = None
    status: str = "unknown"  # present, missing, partial, size_mismatch; then downloaded / would_download
    local_bytes: int = 0  # bytes already on disk (target or .part) that count toward the file
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "repo": self.repo,
            "path": self.path,
            "target": self.target,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.etag if is_sha256(self.etag) else None,
            "status": self.status,
            "local_bytes": self.local_bytes,
        }


def resolve_precision(requested: str, device: str | None = None) -> tuple[str, str]:
    """The transformer precision to fetch, and why: this card's Nunchaku precision, else int4."""
    if requested in ("int4", "fp4"):
        return requested, f"--precision {requested}"
    from qwen_edit.hardware import describe_device

    info = describe_device(device)
    native = info.nunchaku_precision
    if native is not None:
        return native, f"{info.name} ({info.sm}) runs Nunchaku {native} files"
    where = "this machine has no CUDA GPU" if info.capability is None else f"{info.name} ({info.sm})"
    return "int4", (
        f"{where}, no Nunchaku 4-bit kernels: int4 files, run by the portable backend "
        "(pass --precision fp4 for an RTX 50xx)"
    )


def planned_files(precision: str, ranks: list[int], steps: list[int]) -> list[RemoteFile]:
    """The files of one download, the tokenizer folder as a placeholder until it is listed."""
    files = [
        RemoteFile(REPO_TRANSFORMER, name, f"diffusion_models/{name}", "transformer")
        for rank in ranks
        for step in steps
        for name in [TRANSFORMER_FILE.format(precision=precision, rank=rank, steps=step)]
    ]
    files.append(
        RemoteFile(
            REPO_COMFY,
            f"split_files/text_encoders/{TEXT_ENCODER_FILE}",
            f"text_encoders/{TEXT_ENCODER_FILE}",
            "text_encoder",
        )
    )
    files.append(RemoteFile(REPO_COMFY, f"split_files/vae/{VAE_FILE}", f"vae/{VAE_FILE}", "vae"))
    return files


def list_tokenizer() -> list[RemoteFile]:
    """The files of Qwen/Qwen-Image-Edit-2509's tokenizer/ folder (listed, not guessed)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = list(HfApi().list_repo_tree(REPO_TOKENIZER, path_in_repo="tokenizer"))
    except Exception as exc:
        raise hub_error(exc, REPO_TOKENIZER, "tokenizer/") from exc
    files = [
        RemoteFile(
            REPO_TOKENIZER, e.path, f"{TOKENIZER_TARGET}/{Path(e.path).name}", "tokenizer", size=e.size
        )
        for e in entries
        if isinstance(e, RepoFile)
    ]
    names = {Path(f.path).name for f in files}
    missing = [n for n in TOKENIZER_REQUIRED if n not in names]
    if missing:
        raise CliError(
            "hub_file_not_found",
            f"{REPO_TOKENIZER} tokenizer/ has no {', '.join(missing)} (found: {sorted(names) or 'nothing'})",
            EXIT_NETWORK,
            fix="check $HF_ENDPOINT, or put ComfyUI's qwen25_tokenizer/ folder beside the text encoder",
        )
    return files


def fetch_metadata(files: list[RemoteFile], timeout: float = 10.0) -> None:
    """Size, etag and commit of each file: a HEAD per file, as hf_hub_download does."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    for f in files:
        try:
            meta = get_hf_file_metadata(hf_hub_url(f.repo, f.path), timeout=timeout)
        except Exception as exc:
            raise hub_error(exc, f.repo, f.path) from exc
        if meta.size is None:
            raise CliError("hub_error", f"the hub sent no size for {f.repo}/{f.path}", EXIT_NETWORK)
        f.size, f.etag, f.commit = meta.size, meta.etag, meta.commit_hash


def hub_error(exc: Exception, repo: str, path: str) -> CliError:
    """A hub failure as a CliError with the likely fix (the error types exist since huggingface_hub 0.20)."""
    from huggingface_hub import errors

    where = f"{repo}/{path}"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    known = (  # first match wins: GatedRepoError is a RepositoryNotFoundError, all are HfHubHTTPErrors
        (errors.OfflineModeIsEnabled, "offline", f"cannot fetch {where}: HF_HUB_OFFLINE is set",
         "unset HF_HUB_OFFLINE, or copy the files into the models folder yourself"),
        (errors.GatedRepoError, "hub_unauthorized", f"{repo} is gated: {exc}",
         f"accept the license on {endpoint}/{repo} and set HF_TOKEN"),
        (errors.RepositoryNotFoundError, "hub_repo_not_found",
         f"repository {repo} not found or not accessible on {endpoint}",
         "check $HF_ENDPOINT and, for private mirrors, HF_TOKEN"),
        (errors.EntryNotFoundError, "hub_file_not_found", f"{where} does not exist on {endpoint}",
         "check --precision/--rank/--steps: not every combination is published"),
        (errors.HfHubHTTPError, "hub_error", f"{where}: {exc}", "retry later; check HF_TOKEN"),
    )  # fmt: skip
    for kind, code, message, fix in known:
        if isinstance(exc, kind):
            return CliError(code, message, EXIT_NETWORK, fix=fix)
    return CliError(
        "network_error",
        f"cannot reach {endpoint} for {where}: {type(exc).__name__}: {exc}",
        EXIT_NETWORK,
        fix="check the network (or $HF_ENDPOINT / proxy settings) and rerun; "
        "finished files are kept and partial ones resume",
    )


# -- local state ---------------------------------------------------------------------------------


def part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(path: Path) -> None:
    """Delete a bad download and its sidecar."""
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)


def _size_mismatch(part: Path, f: RemoteFile, got: int, message: str) -> CliError:
    """Discard `part`, whose byte count contradicts the hub's, and say so."""
    _discard(part)
    return CliError(
        "size_mismatch",
        f"{f.target}: {message}; the partial file was deleted",
        EXIT_NETWORK,
        fix="rerun `qwen-edit download`; if it persists, check $HF_ENDPOINT",
        details={"target": f.target, "bytes": got, "size": f.size},
    )


def _read_sidecar(part: Path) -> dict:
    try:
        return json.loads(_sidecar(part).read_text())
    except (OSError, ValueError):
        return {}


def inspect_local(files: list[RemoteFile], models_dir: Path) -> None:
    """Set each file's status from what is on disk: present, size_mismatch, partial or missing."""
    for f in files:
        target = models_dir / f.target
        part = part_path(target)
        if target.is_file():
            have = target.stat().st_size
            f.extra["local_size"] = have
            if f.size is None or have == f.size:
                f.status, f.local_bytes = "present", have
                continue
            f.status = "size_mismatch"
        if part.is_file() and _resumable(part, f):
            f.status, f.local_bytes = "partial", part.stat().st_size
        elif f.status != "size_mismatch":
            f.status = "missing"


def _resumable(part: Path, f: RemoteFile) -> bool:
    meta = _read_sidecar(part)
    size = part.stat().st_size
    return meta.get("etag") == f.etag and meta.get("size") == f.size and f.size is not None and size <= f.size


def free_bytes(folder: Path) -> int:
    """Free disk space where `folder` is (or would be created)."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk(files: list[RemoteFile], models_dir: Path) -> int:
    """Bytes still to fetch; raises when the disk can't hold them."""
    needed = sum((f.size or 0) - f.local_bytes for f in files if f.status != "present")
    free = free_bytes(models_dir)
    if needed > free:
        raise CliError(
            "insufficient_disk",
            f"{human_bytes(needed)} still to download but only {human_bytes(free)} free at {models_dir}",
            EXIT_RUNTIME,
            fix="free space, or pick another folder with --models-dir (a network volume on RunPod)",
            details={"needed_bytes": needed, "free_bytes": free},
        )
    return needed


# -- transfer ------------------------------------------------------------------------------------


class _NoAuthAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never send the hub token to another host (the hub redirects LFS files to
    a CDN with a presigned URL that needs no token)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if (
            new is not None
            and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc
        ):
            for name in list(new.headers):
                if name.lower() == "authorization":
                    del new.headers[name]
        return new


class _Retryable(Exception):
    """A transfer that stopped early (connection lost, timeout): resume it."""


ProgressFn = Callable[[RemoteFile, int], None]


def download_file(
    f: RemoteFile,
    models_dir: Path,
    *,
    progress: ProgressFn | None = None,
    retries: int = 5,
    checksum: bool = False,
    timeout: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch `f` into `<models_dir>/<target>`, resuming a matching `.part`; verify; rename into place."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    assert f.size is not None, "fetch_metadata first"
    target = models_dir / f.target
    part = part_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if part.exists() and not _resumable(part, f):
        part.unlink()  # another version of the file, or longer than it should be: start over
    _sidecar(part).write_text(json.dumps({"repo": f.repo, "path": f.path, "etag": f.etag, "size": f.size}))
    # Pin the commit the HEAD saw, so a push to the repo mid-download can't mix versions.
    url = hf_hub_url(f.repo, f.path, revision=f.commit or "main")
    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    opener = urllib.request.build_opener(_NoAuthAcrossHosts)
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have >= f.size:
            break
        try:
            _transfer(opener, url, headers, part, have, f, progress, timeout)
            failures = 0
        except _Retryable as exc:
            grew = (part.stat().st_size if part.exists() else 0) > have
            failures = 0 if grew else failures + 1
            if failures > retries:
                done = part.stat().st_size if part.exists() else 0
                raise CliError(
                    "download_incomplete",
                    f"{f.target}: the download stopped at {done} of {f.size} bytes ({exc})",
                    EXIT_NETWORK,
                    fix="rerun the same `qwen-edit download` command: it resumes from the partial file",
                    details={"target": f.target, "bytes": done, "size": f.size},
                ) from exc
            sleep(min(2.0 ** max(failures - 1, 0), 30.0))
    got = part.stat().st_size
    if got != f.size:  # the loop exits only at >= size; more than the hub said is a bad file
        raise _size_mismatch(part, f, got, f"received {got} bytes, the hub says {f.size}")
    if checksum:
        verify_checksum(f, part)
    os.replace(part, target)
    _sidecar(part).unlink(missing_ok=True)
    return target


def _transfer(
    opener, url: str, headers: dict, part: Path, have: int, f: RemoteFile, progress, timeout
) -> None:
    request = urllib.request.Request(
        url, headers={**headers, **({"Range": f"bytes={have}-"} if have else {})}
    )
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code in (408, 429, 500, 502, 503, 504):
            raise _Retryable(f"HTTP {exc.code}") from exc
        if exc.code == 416 and have:  # the server's file ends before the size the hub's HEAD gave
            message = (
                f"the server has fewer bytes than the {f.size} the hub's metadata gives "
                f"(range from {have} refused)"
            )
            raise _size_mismatch(part, f, have, message) from exc
        raise CliError(
            "hub_error",
            f"{f.repo}/{f.path}: HTTP {exc.code} {exc.reason}",
            EXIT_NETWORK,
            fix="check HF_TOKEN and $HF_ENDPOINT",
        ) from exc
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
    with response:
        if have and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                part.unlink()
                raise _Retryable(f"unexpected Content-Range {content_range!r}")
            mode = "ab"
        else:  # 200: the server ignored the range (or we asked for none): write from the start
            mode = "wb"
            have = 0
        done = have
        try:
            with part.open(mode) as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(f, done)
                    if done > f.size:
                        break
        except (OSError, HTTPException) as exc:  # connection dropped or timed out mid-body
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise CliError(
                    "insufficient_disk",
                    f"disk full while writing {part}",
                    EXIT_RUNTIME,
                    fix="free space and rerun; the partial file resumes",
                ) from exc
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
    if done < f.size:
        raise _Retryable(f"connection closed after {done} of {f.size} bytes")


def is_sha256(etag: str | None) -> bool:
    return etag is not None and re.fullmatch(r"[0-9a-f]{64}", etag) is not None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 * CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(f: RemoteFile, path: Path) -> bool:
    """Compare a finished download with the hub's sha256 (the etag of LFS files); a mismatch deletes it
    and raises. False when the hub gives no sha256 (small git files: checked by size only)."""
    if not is_sha256(f.etag):
        return False
    actual = sha256_file(path)
    if actual != f.etag:
        _discard(path)
        raise CliError(
            "checksum_mismatch",
            f"{f.target}: sha256 {actual} but the hub says {f.etag}; the download was deleted",
            EXIT_NETWORK,
            fix="rerun `qwen-edit download` to fetch it again",
        )
    return True


def check_present(files: list[RemoteFile], models_dir: Path) -> None:
    """--checksum: files present at the right size are hashed; a mismatch is fetched again."""
    for f in files:
        if f.status == "present" and is_sha256(f.etag):
            if sha256_file(models_dir / f.target) == f.etag:
                f.extra["sha256_verified"] = True
            else:
                f.status, f.local_bytes = "corrupt", 0


def validate_choices(ranks: list[int], steps: list[int]) -> None:
    bad = [r for r in ranks if r not in (32, 128)] + [s for s in steps if s not in (4, 8)]
    if bad:
        raise CliError(
            "bad_parameter", f"unsupported value {bad[0]}: --rank takes 32/128, --steps 4/8", EXIT_USAGE
        )


# -- the command ---------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace, reporter: Reporter) -> int:
    from .locations import default_download_dir

    validate_choices(args.rank, args.steps)
    models_dir = Path(args.models_dir).expanduser().absolute() if args.models_dir else default_download_dir()
    precision, why = resolve_precision(args.precision, args.device)
    files = planned_files(precision, sorted(set(args.rank), reverse=True), sorted(set(args.steps)))
    fetch_metadata(files)  # HEADs first: they fail fast (no retries) when the hub is unreachable
    if not args.no_tokenizer:
        tokenizer = list_tokenizer()
        fetch_metadata(tokenizer)
        files.extend(tokenizer)
    inspect_local(files, models_dir)
    if args.checksum:
        check_present(files, models_dir)
    to_fetch = [f for f in files if f.status != "present"]
    needed = sum((f.size or 0) - f.local_bytes for f in to_fetch)
    free = free_bytes(models_dir)
    reporter.event(
        "plan",
        models_dir=str(models_dir),
        precision=precision,
        reason=why,
        files=[f.to_dict() for f in files],
        bytes_to_fetch=needed,
        free_bytes=free,
    )
    reporter.note(f"models folder: {models_dir}\nprecision: {precision} ({why})")
    width = max(len(f.target) for f in files)
    for f in files:
        state = {
            "present": "present",
            "missing": "to fetch",
            "size_mismatch": "wrong size, to fetch again",
            "corrupt": "sha256 mismatch, to fetch again",
            "partial": f"partial ({human_bytes(f.local_bytes)}), to resume",
        }[f.status]
        reporter.say(f"  {f.target:<{width}}  {human_bytes(f.size):>10}  {state:<12}  <- {f.repo}/{f.path}")
    reporter.say(f"{human_bytes(needed)} to fetch, {human_bytes(free)} free")
    if args.dry_run:
        for f in to_fetch:
            f.status = "would_download"
        return reporter.succeed(
            {
                "dry_run": True,
                "models_dir": str(models_dir),
                "precision": precision,
                "reason": why,
                "files": [f.to_dict() for f in files],
                "bytes_to_fetch": needed,
                "free_bytes": free,
            }
        )
    check_disk(files, models_dir)
    total_done = 0
    for f in files:
        if f.status == "present":
            verified = bool(f.extra.get("sha256_verified"))
            reporter.event(
                "skipped", target=f.target, size=f.size, reason="present", sha256_verified=verified
            )
            continue
        start = time.monotonic()
        reporter.event(
            "download_start",
            target=f.target,
            repo=f.repo,
            path=f.path,
            size=f.size,
            resume_from=f.local_bytes,
        )
        if not sys.stderr.isatty():  # no progress bar: say what is going on
            reporter.note(f"fetching {f.target} ({human_bytes(f.size)}) from {f.repo} ...")
        with _DownloadProgress(reporter, f) as progress:
            download_file(f, models_dir, progress=progress, retries=args.retries, checksum=args.checksum)
        seconds = time.monotonic() - start
        total_done += f.size - f.local_bytes
        f.status = "downloaded"
        reporter.event(
            "download_done",
            target=f.target,
            size=f.size,
            seconds=round(seconds, 3),
            sha256_verified=args.checksum and is_sha256(f.etag),
        )
        reporter.note(f"fetched {f.target} ({human_bytes(f.size)}, {seconds:.1f} s)")
    reporter.say(f"done: {len(files)} files in {models_dir}")
    return reporter.succeed(
        {
            "models_dir": str(models_dir),
            "precision": precision,
            "reason": why,
            "files": [f.to_dict() for f in files],
            "bytes_fetched": total_done,
        }
    )


class _DownloadProgress:
    """A byte progress bar on a terminal, throttled `download_progress` events with --json."""

    def __init__(self, reporter: Reporter, f):
        self.reporter, self.f, self.bar, self.last = reporter, f, None, 0.0

    def __enter__(self):
        if not self.reporter.json_mode and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.f.size,
                initial=self.f.local_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=Path(self.f.target).name[-40:],
                file=sys.stderr,
            )
        return self.update

    def update(self, f, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        now = time.monotonic()
        if done >= (f.size or 0) or now - self.last >= 0.5:
            self.last = now
            self.reporter.event("download_progress", target=f.target, bytes=done, size=f.size)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
