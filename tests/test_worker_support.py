"""Helpers shared by the RunPod worker tests (test_worker_*.py); no tests here.

One demo worker per test process (the tiny random model on the CPU, loaded once), real PIL images,
loopback servers only: an HTTP server for image URLs, moto's S3 server, the SDK's own API app.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import io
import ipaddress
import json
import shutil
import socket
import tempfile
import threading
from contextlib import contextmanager, suppress
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from runners.worker.handler import Worker, WorkerConfig, make_handler
from runners.worker.images import UrlPolicy

REPO = Path(__file__).resolve().parents[1]
TMP = Path(tempfile.mkdtemp(prefix="qwen-edit-worker-tests-"))
atexit.register(shutil.rmtree, TMP, ignore_errors=True)
DEMO_CACHE = TMP / "demo"
INPUT_DIR = TMP / "input"
LOOPBACK_ONLY = UrlPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))


def picture(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def valid_input(**changes) -> dict:
    """A small, fast edit: one 96x64 picture, 64x64 output, 4 steps."""
    payload = {
        "image_base64": b64(encode(picture())),
        "prompt": "make it blue",
        "seed": 7,
        "width": 64,
        "height": 64,
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


@cache
def demo_worker() -> Worker:
    """The process's demo worker, started (pipeline loaded) once."""
    INPUT_DIR.mkdir(parents=True, exist_ok=True)
    config = WorkerConfig(
        demo=True,
        demo_cache=str(DEMO_CACHE),
        input_dirs=(INPUT_DIR,),
        url_policy=LOOPBACK_ONLY,
        cuda_wait=1.0,
    )
    worker = Worker(config)
    worker.start()
    assert worker.pipe is not None, "the demo pipeline did not load"
    return worker


def worker_with(**config_changes) -> Worker:
    """A worker with other settings that shares the demo worker's loaded pipeline (no reload)."""
    base = demo_worker()
    worker = Worker(dataclasses.replace(base.config, **config_changes))
    worker._start()
    worker.pipe, worker.loaded, worker.offload = base.pipe, base.loaded, base.offload
    return worker


def api_client(worker: Worker):
    """The SDK's local API server app (`--rp_serve_api`), in process."""
    from fastapi.testclient import TestClient
    from runpod.serverless.modules import rp_fastapi

    return TestClient(rp_fastapi.WorkerAPI({"handler": make_handler(worker)}).rp_app)


def runsync(client, payload: dict) -> dict:
    response = client.post("/runsync", json={"input": payload})
    assert response.status_code == 200, response.text
    return response.json()


def error_of(body: dict) -> dict:
    """The structured error of a FAILED job (the SDK carries it as JSON text)."""
    assert body.get("status", "FAILED") == "FAILED" and "error" in body, body
    return json.loads(body["error"])


def decode_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "PNG"
    return image


def free_port() -> int:
    """A loopback port with nothing listening on it (for 'unreachable' tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackHTTP:
    """A threaded HTTP server on 127.0.0.1: `routes[path] = (status, headers, body)`; counts requests."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.hits: list[str] = []
        self.posts: list[tuple[str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                status, headers, body = outer.routes.get(self.path, (404, {}, b"not found"))
                if callable(body):
                    body(self)
                    return
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.posts.append((self.path, self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None  # clients that hang up on purpose are not news
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> LoopbackHTTP:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class StalledServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers nor closes it: a store
    that hangs (each request waits for the client's read timeout)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)  # held open, never read from nor written to

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StalledServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() waiting in the thread
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@contextmanager
def moto_s3(bucket: str = "volume-1"):
    """moto's S3 server on 127.0.0.1 with `bucket` created; yields (endpoint_url, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="user_test",
            aws_secret_access_key="rps_test",
        )
        client.create_bucket(Bucket=bucket)
        yield endpoint, client
    finally:
        server.stop()
