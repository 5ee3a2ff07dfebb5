"""Input images for the worker, fetched and decoded defensively.

Every source ends as bytes under a size cap, then as a PIL image whose header was checked before any
pixel was decoded:
- base64 / data URIs: the text length is checked before decoding;
- file names: resolved only inside the configured input folders (qwen_edit.paths' rules: no `..`, no
  absolute paths, no symlink escapes);
- URLs: http(s) only; the host is resolved once, every address checked (loopback, private, link-local,
  CGNAT, multicast, reserved and IPv6 forms embedding them are refused unless configured), and the
  connection is made to the checked address (no second DNS lookup that a rebinding server could
  answer differently); redirects are followed by hand and each hop is checked again; a size cap and a
  wall-clock limit bound the download;
- object keys: runners.worker.storage, from the configured bucket, with the same size cap.
Decoding: only PNG, JPEG and WebP decoders are tried; width, height and pixel count are checked from
the header, so a decompression bomb is refused without inflating it; a truncated file is an error, not
a half-grey picture.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from PIL import Image

from qwen_edit.paths import UnsafeModelNameError, check_model_name, confine

from . import storage
from .deadline import DeadlinePassed, call_by
from .public import without_paths
from .schema import ImageSource, WorkerError

FORMATS = ("PNG", "JPEG", "WEBP")
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3
CHUNK = 64 * 1024
# RFC 6052's well-known NAT64 prefix: 64:ff9b::a.b.c.d reaches the IPv4 address a.b.c.d.
NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000  # a 50 MP photo decodes to 150 MB of RGB; the pipeline uses ~1 MP
    max_side: int = 16384
    url_timeout: float = 30.0


@dataclass(frozen=True)
class UrlPolicy:
    """Which non-public addresses a URL may reach: none (default), listed networks, or all."""

    allow_all_private: bool = False
    allowed_networks: tuple = ()

    @classmethod
    def parse(cls, value: str | None) -> UrlPolicy:
        """QWEN_EDIT_ALLOW_PRIVATE_URLS: empty/false, true (everything), or "127.0.0.1/32,10.0.0.0/8"."""
        text = (value or "").strip().lower()
        if text in ("", "0", "false", "no", "off"):
            return cls()
        if text in ("1", "true", "yes", "on", "all"):
            return cls(allow_all_private=True)
        networks = []
        for item in text.split(","):
            if item.strip():
                try:
                    networks.append(ipaddress.ip_network(item.strip(), strict=False))
                except ValueError:
                    raise ValueError(
                        f"QWEN_EDIT_ALLOW_PRIVATE_URLS: {item.strip()!r} is not a network (e.g. 10.0.0.0/8)"
                    ) from None
        return cls(allowed_networks=tuple(networks))

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be reached; None if it may."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if self.allow_all_private or any(
            ip in net for net in self.allowed_networks if net.version == ip.version
        ):
            return None
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = self.refusal(str(embedded))
            return None if reason is None else f"{ip} embeds {embedded}: {reason}"
        if ip.is_loopback:
            return f"{ip} is a loopback address"
        if ip.is_link_local:
            return f"{ip} is a link-local address (cloud metadata services live there)"
        if ip.is_multicast or ip.is_unspecified or not ip.is_global:
            return f"{ip} is a private, reserved or otherwise non-public address"
        return None


def _embedded_ipv4(ip) -> ipaddress.IPv4Address | None:
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


# -- sources -> bytes -------------------------------------------------------------------------------


def load_source(
    source: ImageSource,
    *,
    store: storage.StorageConfig,
    input_dirs: Sequence[Path],
    policy: UrlPolicy,
    limits: ImageLimits,
    deadline: float | None = None,
) -> Image.Image:
    """One request image, from wherever it is, decoded."""
    if source.kind == "base64":
        data = decode_base64(source.value, source.field, limits.max_bytes)
    elif source.kind == "name":
        data = read_named(source.value, source.field, input_dirs, limits.max_bytes)
    elif source.kind == "url":
        data = fetch_url(source.value, source.field, policy, limits, deadline)
    else:
        data = read_object(source.value, source.field, store, limits.max_bytes, deadline)
    return decode_image(data, source.field, limits)


def read_object(
    key: str, field: str, store: storage.StorageConfig, max_bytes: int, deadline: float | None = None
) -> bytes:
    """An object from the configured bucket (runners.worker.storage), under the size cap, by the
    deadline (a store that never answers costs the job its deadline, not botocore's retries)."""
    if not store.configured:
        raise WorkerError(
            "STORAGE_NOT_CONFIGURED",
            "the worker has no bucket to read object keys from",
            field=field,
            fix="set RUNPOD_STORAGE_* on the endpoint, or send image_base64",
        )
    try:
        if deadline is None:
            return storage.download_bytes(store, key, max_bytes)
        bounded = store.bounded_by(deadline - time.monotonic())
        return call_by(deadline, lambda: storage.download_bytes(bounded, key, max_bytes))
    except DeadlinePassed:
        raise WorkerError(
            "IMAGE_FETCH_FAILED",
            f"the store did not deliver {key!r} before the job's deadline",
            field=field,
            retryable=True,
            fix="check that the store answers, or raise timeout",
        ) from None
    except storage.StorageTooLargeError as exc:
        raise WorkerError("IMAGE_TOO_LARGE", str(exc), field=field) from None
    except storage.StorageConfigError as exc:  # outside the allowed input prefix
        raise WorkerError("UNSAFE_NAME", exc.message, field=field) from None
    except storage.StorageError as exc:
        raise WorkerError(
            "IMAGE_FETCH_FAILED",
            str(exc),
            field=field,
            retryable=not exc.client_fault,
            fix="check the key and the bucket (the object must exist)",
        ) from None


def decode_base64(text: str, field: str, max_bytes: int) -> bytes:
    """Plain or URL-safe base64, or a data URI (`data:image/png;base64,...`); whitespace ignored."""
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise WorkerError(
                "INVALID_IMAGE",
                "the data URI is not base64-encoded",
                field=field,
                fix="use data:image/png;base64,<data>",
            )
        mime = header[5:].split(";", 1)[0].lower()
        if mime and not mime.startswith("image/"):
            raise WorkerError("INVALID_IMAGE", f"the data URI holds {mime}, not an image", field=field)
        text = payload
    text = re.sub(r"\s+", "", text)
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:  # before decoding: the text alone says the size
        raise WorkerError(
            "IMAGE_TOO_LARGE",
            f"the encoded image is over the {_mib(max_bytes)} limit",
            field=field,
            fix="send a smaller image, or upload it and pass image_object_key or image_url",
        )
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WorkerError(
            "INVALID_IMAGE",
            "is not valid base64",
            field=field,
            fix="send the image file's bytes base64-encoded (or as a data URI)",
        ) from None
    if not data:
        raise WorkerError("INVALID_IMAGE", "the decoded image is empty", field=field)
    return data


def read_named(name: str, field: str, folders: Sequence[Path], max_bytes: int) -> bytes:
    """A file by name from the input folders (ComfyUI's input/ on the volume), never outside them."""
    try:
        check_model_name(name, field)
        for folder in folders:
            candidate = folder / name
            if candidate.is_file():
                path = confine(candidate, folder, field)
                size = path.stat().st_size
                if size > max_bytes:
                    raise WorkerError(
                        "IMAGE_TOO_LARGE",
                        f"{name!r} is {_mib(size)}, over the {_mib(max_bytes)} limit",
                        field=field,
                    )
                return path.read_bytes()
    except UnsafeModelNameError as exc:  # the folders are the worker's business, not the client's
        raise WorkerError(
            "UNSAFE_NAME",
            without_paths(exc.message, {"input folder": folders}),
            field=field,
            fix="give a file name relative to the input folder",
        ) from None
    raise WorkerError(
        "IMAGE_NOT_FOUND",
        f"no file {name!r} in the worker's input folder{'s' if len(folders) > 1 else ''}",
        field=field,
        fix="check the name, or send the image as image_base64, image_url or image_object_key",
    )


def fetch_url(
    url: str, field: str, policy: UrlPolicy, limits: ImageLimits, deadline: float | None = None
) -> bytes:
    """GET an http(s) URL with the address, redirect, size and time checks described above."""
    stop = time.monotonic() + limits.url_timeout
    if deadline is not None:
        stop = min(stop, deadline)
    for _hop in range(MAX_REDIRECTS + 1):
        parts, address = check_url(url, field, policy, stop)
        parts = _ascii_url(parts, field)
        remaining = stop - time.monotonic()
        if remaining <= 0:
            raise _fetch_error(field, url, "the time limit for downloading passed")
        try:
            status, location, body = _get(parts, address, remaining, stop, limits.max_bytes, field, url)
        except (OSError, http.client.HTTPException) as exc:
            raise _fetch_error(field, url, f"{type(exc).__name__}: {exc}") from None
        if status in REDIRECTS:
            if not location:
                raise _fetch_error(field, url, f"HTTP {status} without a Location header")
            url = urljoin(url, location)
            continue
        if status != 200:  # 4xx but 408 and 429: the URL is wrong, and trying again won't help
            client_fault = 400 <= status < 500 and status not in (408, 429)
            raise _fetch_error(field, url, f"HTTP {status}", retryable=not client_fault)
        return body
    raise _fetch_error(field, url, f"more than {MAX_REDIRECTS} redirects")


def check_url(url: str, field: str, policy: UrlPolicy, deadline: float | None = None) -> tuple:
    """(split URL, the checked address to connect to), or URL_NOT_ALLOWED. The host's name is resolved
    by `deadline` (a name server that never answers costs the job no more)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL", ...
        raise _bad_url(field, f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise WorkerError(
            "URL_NOT_ALLOWED",
            f"only http and https URLs are fetched, not {parts.scheme or 'no scheme'!r}",
            field=field,
            fix="give an http(s) URL, or send the image as image_base64",
        )
    if not parts.hostname:
        raise WorkerError("URL_NOT_ALLOWED", f"{url!r} has no host", field=field)
    if parts.username is not None or parts.password is not None:
        raise WorkerError("URL_NOT_ALLOWED", "credentials in URLs are not accepted", field=field)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WorkerError("URL_NOT_ALLOWED", f"{url!r} has an invalid port", field=field) from None
    host = _ascii_host(parts.hostname, field)

    def resolve() -> list:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    try:
        infos = resolve() if deadline is None else call_by(deadline, resolve)
    except DeadlinePassed:
        raise _fetch_error(field, url, f"resolving {parts.hostname!r} took past the time limit") from None
    except OSError as exc:
        raise _fetch_error(field, url, f"cannot resolve {parts.hostname!r} ({exc})") from None
    addresses = sorted({info[4][0] for info in infos})
    for address in addresses:  # all of them: a host with one public and one private address is refused
        reason = policy.refusal(address)
        if reason is not None:
            raise WorkerError(
                "URL_NOT_ALLOWED",
                f"{parts.hostname} resolves to {reason}",
                field=field,
                fix="use a public URL (internal addresses are allowed only by the worker's "
                "QWEN_EDIT_ALLOW_PRIVATE_URLS setting)",
            )
    return parts, (addresses[0], port)


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address checked beforehand; the Host header still names the host."""

    def __init__(self, host: str, address: tuple, timeout: float):
        super().__init__(host, address[1], timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection(self._address, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """As _PinnedHTTP, with TLS verified against the host name (SNI and certificate)."""

    def __init__(self, host: str, address: tuple, timeout: float):
        super().__init__(host, address[1], timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection(self._address, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _get(parts, address: tuple, timeout: float, stop: float, max_bytes: int, field: str, url: str):
    cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = cls(parts.hostname, address, timeout)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"User-Agent": "qwen-edit-worker", "Accept": "image/*"})
        response = conn.getresponse()
        if response.status in REDIRECTS or response.status != 200:
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise WorkerError(
                "IMAGE_TOO_LARGE",
                f"the URL's image is {_mib(int(length))}, over the {_mib(max_bytes)} limit",
                field=field,
            )
        chunks, total = [], 0
        while True:
            remaining = stop - time.monotonic()
            if remaining <= 0:
                raise _fetch_error(field, url, "the time limit for downloading passed")
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            chunk = response.read1(CHUNK)  # what one recv gives: read() would wait for a full chunk
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise WorkerError(
                    "IMAGE_TOO_LARGE", f"the URL's image is over the {_mib(max_bytes)} limit", field=field
                )
            chunks.append(chunk)
        return response.status, None, b"".join(chunks)
    finally:
        conn.close()


def _ascii_host(hostname: str, field: str) -> str:
    """The host as DNS and the Host header take it: international names in their IDNA (xn--) form."""
    if hostname.isascii() and all(32 < ord(c) < 127 for c in hostname):
        return hostname
    try:
        return hostname.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise _bad_url(field, f"has a host name that is not valid ({exc})") from None


# What may stay as it is in a request target; anything else (non-ASCII, spaces, control characters) is
# percent-encoded from UTF-8, as browsers send such URLs.
TARGET_SAFE = "/%:@!$&'()*+,;=-._~?#[]"


def _ascii_url(parts, field: str):
    """`parts` with an ASCII host and a percent-encoded path and query (http.client sends ASCII only)."""
    host = _ascii_host(parts.hostname, field)
    netloc = f"[{host}]" if ":" in host else host  # no credentials: check_url refused them
    if parts.port is not None:
        netloc += f":{parts.port}"
    path, query = quote(parts.path, safe=TARGET_SAFE), quote(parts.query, safe=TARGET_SAFE)
    return parts._replace(netloc=netloc, path=path, query=query)


def _bad_url(field: str, why: str) -> WorkerError:
    return WorkerError(
        "INVALID_INPUT", why, field=field, fix="give a complete http(s) URL, e.g. https://example.com/a.png"
    )


def _fetch_error(field: str, url: str, why: str, retryable: bool = True) -> WorkerError:
    shown = url if len(url) <= 200 else url[:200] + "..."
    return WorkerError(
        "IMAGE_FETCH_FAILED",
        f"could not download {shown}: {why}",
        field=field,
        retryable=retryable,
        fix="check that the URL is reachable from the internet and returns the image itself",
    )


# -- bytes -> image ---------------------------------------------------------------------------------


def decode_image(data: bytes, field: str, limits: ImageLimits) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes, checking the size from the header before any pixel is inflated."""
    if len(data) > limits.max_bytes:
        raise WorkerError(
            "IMAGE_TOO_LARGE", f"{_mib(len(data))} is over the {_mib(limits.max_bytes)} limit", field=field
        )
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning; the limits below are what decide
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise WorkerError("IMAGE_TOO_LARGE", str(exc), field=field) from None
    except Image.UnidentifiedImageError:
        raise WorkerError(
            "INVALID_IMAGE",
            "is not a PNG, JPEG or WebP image",
            field=field,
            fix="send a PNG, JPEG or WebP file",
        ) from None
    except Exception as exc:  # PIL raises SyntaxError, struct.error, ... on broken headers
        raise WorkerError("INVALID_IMAGE", f"unreadable image header ({exc})", field=field) from None
    width, height = image.size
    if width < 1 or height < 1 or max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise WorkerError(
            "IMAGE_TOO_LARGE",
            f"{width}x{height} is over the limits ({limits.max_side} pixels a side, "
            f"{limits.max_pixels / 1e6:.0f} megapixels)",
            field=field,
            fix="downscale the image first (the edit works at about one megapixel)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()  # a truncated file raises here (PIL's LOAD_TRUNCATED_IMAGES stays off)
    except Exception as exc:
        raise WorkerError(
            "INVALID_IMAGE",
            f"the {image.format} data is broken or truncated ({exc})",
            field=field,
            fix="send the complete file",
        ) from None
    return image


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
