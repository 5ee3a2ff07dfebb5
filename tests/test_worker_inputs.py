"""The worker's input side without the model: schema, base64, image decoding, names, URL fetching."""

from __future__ import annotations

import ipaddress
import os
import struct
import time
import zlib

import pytest
from test_worker_support import LOOPBACK_ONLY, LoopbackHTTP, b64, encode, picture

from runners.worker import images
from runners.worker.images import ImageLimits, UrlPolicy
from runners.worker.schema import ERROR_CODES, WorkerError, parse_request

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000, max_side=4096, url_timeout=5.0)


def parse(**fields):
    return parse_request(fields, max_timeout=3600)


def codes(fields: dict) -> dict[str, str]:
    """{field: code} of every error parse_request reports for `fields`."""
    with pytest.raises(WorkerError) as info:
        parse_request(fields, max_timeout=3600)
    return {e["field"]: e["code"] for e in info.value.details["errors"]}


# -- schema ----------------------------------------------------------------------------------------


def test_every_seed_field_is_accepted():
    request = parse(
        image_name="in.png",
        prompt="p",
        negative_prompt="n",
        seed=5,
        steps=8,
        cfg=2.5,
        sampler_name="heun",
        scheduler="karras",
        denoise=0.9,
        shift=2.0,
        width=512,
        height=384,
        batch_size=2,
        model_name="m.safetensors",
        clip_name="c.safetensors",
        vae_name="v.safetensors",
        lora_name="l.safetensors",
        lora_strength=0.5,
        cpu_offload="enable",
        num_blocks_on_gpu=4,
        use_pin_memory=True,
        timeout=30,
        images=["data:image/png;base64,AAAA"],
    )
    assert [s.kind for s in request.images] == ["name", "base64"]
    assert request.edit["steps"] == 8 and request.edit["width"] == 512
    assert request.loras == (("l.safetensors", 0.5, "lora_name"),)
    assert (request.cpu_offload, request.num_blocks_on_gpu, request.use_pin_memory) == ("enable", 4, True)
    assert request.timeout == 30.0 and request.model_name == "m.safetensors"


def test_both_prompts_are_capped_before_any_work():
    """A 10 MB negative prompt once held the worker for minutes (encoded at cfg != 1, unstoppable)."""
    from qwen_edit.params import MAX_PROMPT

    long = "x" * (MAX_PROMPT + 1)
    assert codes({"image_name": "in.png", "prompt": "p", "negative_prompt": long, "cfg": 2.0}) == {
        "negative_prompt": "INVALID_INPUT"
    }
    assert codes({"image_name": "in.png", "prompt": long}) == {"prompt": "INVALID_INPUT"}
    assert parse(image_name="in.png", prompt="p", negative_prompt="x" * MAX_PROMPT).edit["negative_prompt"]


def test_image_name_holds_a_name_or_base64_as_the_seed_allows():
    data = b64(encode(picture(32, 32)))
    assert len(data) > 255
    assert parse(image_name=data, prompt="p").images[0].kind == "base64"
    assert parse(image_name="data:image/png;base64," + data, prompt="p").images[0].kind == "base64"
    assert parse(image_name="photo.png", prompt="p").images[0].kind == "name"


def test_image_lists_mix_kinds_and_count_with_the_single_field():
    request = parse(
        image_url="https://example.com/a.png",
        prompt="p",
        images=[{"image_object_key": "in/b.png"}, "https://example.com/c.jpg"],
    )
    assert [(s.kind, s.field) for s in request.images] == [
        ("url", "image_url"),
        ("object_key", "images[0].image_object_key"),
        ("url", "images[1]"),
    ]
    assert codes({"image_name": "a.png", "prompt": "p", "images": ["b.png", "c.png", "d.png"]}) == {
        "images": "INVALID_INPUT"
    }


def test_lora_forms_and_random_seed():
    assert parse(
        image_name="a.png", prompt="p", lora_name=[["a.safetensors", 0.5], {"name": "b.safetensors"}], seed=-1
    ).loras == (("a.safetensors", 0.5, "lora_name[0]"), ("b.safetensors", 1.0, "lora_name[1]"))
    request = parse(image_name="a.png", prompt="p", lora_name="")
    assert request.loras == () and request.edit.get("seed") is None
    assert parse(image_name="a.png", prompt="p", cpu_offload=False).cpu_offload == "disable"


def test_every_bad_field_gets_its_own_error_with_a_fix():
    with pytest.raises(WorkerError) as info:
        parse_request(
            {
                "prompt": 3,
                "steps": 0,
                "cfg": -1,
                "seed": "x",
                "image_url": "ftp://x/y",
                "vae_name": "../../etc/passwd",
                "timeout": 0,
                "colour": 1,
            },
            max_timeout=3600,
        )
    errors = {e["field"]: e for e in info.value.details["errors"]}
    assert set(errors) == {"prompt", "steps", "cfg", "seed", "image_url", "vae_name", "timeout", "colour"}
    assert errors["vae_name"]["code"] == "UNSAFE_NAME" and errors["image_url"]["code"] == "URL_NOT_ALLOWED"
    assert all(e["fix"] and e["message"] for e in errors.values())
    body = info.value.to_dict()
    first = info.value.details["errors"][0]
    assert (body["code"], body["field"], body["retryable"]) == (first["code"], first["field"], False)
    assert body["code"] in ERROR_CODES and "8 invalid fields" in body["message"]


def test_the_input_itself_must_be_an_object():
    for payload in ([1, 2], "not json", 5):
        with pytest.raises(WorkerError) as info:
            parse_request(payload, max_timeout=60)
        assert info.value.field == "input" and info.value.code == "INVALID_INPUT"
    assert parse_request('{"image_name": "a.png", "prompt": "p"}', max_timeout=60).edit["prompt"] == "p"


# -- base64 and decoding ----------------------------------------------------------------------------


def test_base64_variants_decode_to_the_same_bytes():
    data = encode(picture(40, 30))
    text = b64(data)
    urlsafe = text.replace("+", "-").replace("/", "_").rstrip("=")
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    for variant in (text, urlsafe, wrapped, "data:image/png;base64," + text):
        assert images.decode_base64(variant, "f", LIMITS.max_bytes) == data


@pytest.mark.parametrize(
    "text, code",
    [
        ("not base64 at all!!", "INVALID_IMAGE"),
        ("data:text/plain;base64,aGVsbG8=", "INVALID_IMAGE"),
        ("data:image/png,rawbytes", "INVALID_IMAGE"),
        ("A" * 4_000_000, "IMAGE_TOO_LARGE"),
    ],
)
def test_bad_base64_is_refused(text, code):
    with pytest.raises(WorkerError) as info:
        images.decode_base64(text, "image_base64", LIMITS.max_bytes)
    assert info.value.code == code and info.value.field == "image_base64"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode(fmt):
    image = images.decode_image(encode(picture(50, 40), fmt), "f", LIMITS)
    assert image.size == (50, 40) and image.format == fmt


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR for width x height, then a valid but tiny (truncated) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def decompression_bomb(side: int = 10_000) -> bytes:
    """A real bomb: a side x side grey PNG of zeros, ~100 MB of pixels deflated to ~100 KB."""
    compressor, parts = zlib.compressobj(9), []
    row = b"\0" * (side + 1)  # filter byte + pixels
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    head = png_header_only(side, side)
    head = head[: head.index(b"IDAT") - 4]
    idat = b"".join(parts)
    chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return head + chunk + end


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = decompression_bomb()
    assert len(bomb) < 200_000
    start = time.perf_counter()
    with pytest.raises(WorkerError) as info:
        images.decode_image(bomb, "image_base64", LIMITS)
    assert info.value.code == "IMAGE_TOO_LARGE" and "10000x10000" in info.value.message
    assert time.perf_counter() - start < 0.5  # refused without inflating 100 MB


@pytest.mark.parametrize(
    "data, code",
    [
        (encode(picture(64, 64))[:300], "INVALID_IMAGE"),  # truncated PNG
        (encode(picture(64, 64), "JPEG")[:200], "INVALID_IMAGE"),  # truncated JPEG
        (png_header_only(64, 64), "INVALID_IMAGE"),  # IDAT too short for its pixels
        (png_header_only(5000, 10), "IMAGE_TOO_LARGE"),  # a side over the limit
        (encode(picture(32, 32), "GIF"), "INVALID_IMAGE"),  # a format not on the list
        (encode(picture(32, 32), "TIFF"), "INVALID_IMAGE"),
        (b"GIF89a" + b"\0" * 20, "INVALID_IMAGE"),
        (b"hello world", "INVALID_IMAGE"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "INVALID_IMAGE"),  # a signature, then garbage
    ],
)
def test_broken_or_refused_images(data, code):
    with pytest.raises(WorkerError) as info:
        images.decode_image(data, "images[1]", LIMITS)
    assert info.value.code == code and info.value.field == "images[1]"


# -- names in the input folder ----------------------------------------------------------------------


def test_names_resolve_only_inside_the_input_folder(tmp_path):
    inside, outside = tmp_path / "input", tmp_path / "secret"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.png").write_bytes(encode(picture(8, 8)))
    (outside / "key.png").write_bytes(encode(picture(8, 8)))
    os.symlink(outside / "key.png", inside / "link.png")
    assert images.read_named("a.png", "image_name", [inside], 10_000) == (inside / "a.png").read_bytes()
    for name, code in [
        ("link.png", "UNSAFE_NAME"),
        ("../secret/key.png", "UNSAFE_NAME"),
        (str(outside / "key.png"), "UNSAFE_NAME"),
        ("missing.png", "IMAGE_NOT_FOUND"),
    ]:
        with pytest.raises(WorkerError) as info:
            images.read_named(name, "image_name", [inside], 10_000)
        assert info.value.code == code, name


# -- URLs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.5.5.5",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::1",
        "::",
    ],
)
def test_non_public_addresses_are_refused_by_default(address):
    assert UrlPolicy().refusal(address) is not None


def test_public_addresses_pass_and_allow_lists_open_only_what_they_name():
    assert UrlPolicy().refusal("8.8.8.8") is None and UrlPolicy().refusal("2606:4700:4700::1111") is None
    policy = UrlPolicy.parse("127.0.0.1/32, 10.0.0.0/8")
    assert policy.allowed_networks == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert policy.refusal("127.0.0.1") is None and policy.refusal("10.9.9.9") is None
    assert policy.refusal("127.0.0.2") is not None and policy.refusal("169.254.169.254") is not None
    assert UrlPolicy.parse("true").refusal("169.254.169.254") is None
    with pytest.raises(ValueError):
        UrlPolicy.parse("localhost-ish")


@pytest.fixture()
def http():
    with LoopbackHTTP() as server:
        yield server


def fetch(url: str, policy: UrlPolicy = LOOPBACK_ONLY, limits: ImageLimits = LIMITS) -> bytes:
    return images.fetch_url(url, "image_url", policy, limits)


def fetch_error(url: str, **kwargs) -> WorkerError:
    with pytest.raises(WorkerError) as info:
        fetch(url, **kwargs)
    return info.value


def test_url_fetch_follows_public_redirects_and_returns_the_bytes(http):
    data = encode(picture(20, 20))
    http.routes["/img.png"] = (200, {"Content-Type": "image/png"}, data)
    http.routes["/moved"] = (302, {"Location": "/img.png"}, b"")
    assert fetch(http.url("/moved")) == data
    assert http.hits == ["/moved", "/img.png"]


def test_loopback_is_refused_without_configuration_and_nothing_is_sent(http):
    http.routes["/img.png"] = (200, {}, encode(picture(8, 8)))
    for url in (http.url("/img.png"), f"http://localhost:{http.port}/img.png", f"http://127.1:{http.port}/x"):
        assert fetch_error(url, policy=UrlPolicy()).code == "URL_NOT_ALLOWED"
    assert http.hits == []


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.png",
        "http://127.0.0.2:9/x.png",
        "http://[::1]:9/x.png",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/x",
    ],
)
def test_redirects_are_checked_again(http, target):
    http.routes["/go"] = (301, {"Location": target}, b"")
    assert fetch_error(http.url("/go")).code == "URL_NOT_ALLOWED"
    assert http.hits == ["/go"]


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/a.png",
        "javascript:alert(1)",
        "http://user:pw@127.0.0.1/a.png",
        "http:///nohost",
    ],
)
def test_other_schemes_and_odd_urls_are_refused(url):
    assert fetch_error(url).code == "URL_NOT_ALLOWED"


def test_download_limits(http):
    big = b"x" * (LIMITS.max_bytes + 1)
    http.routes["/declared"] = (200, {}, big)

    def chunked(handler) -> None:  # no Content-Length: the cap must hold while reading
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        piece = b"y" * 65536
        for _ in range(LIMITS.max_bytes // len(piece) + 2):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")

    def slow(handler) -> None:  # a trickle that would never end
        handler.send_response(200)
        handler.send_header("Content-Length", "1000000")
        handler.end_headers()
        for _ in range(100):
            handler.wfile.write(b"z")
            handler.wfile.flush()
            time.sleep(0.1)

    http.routes["/chunked"] = (200, {}, chunked)
    http.routes["/slow"] = (200, {}, slow)
    http.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    assert fetch_error(http.url("/declared")).code == "IMAGE_TOO_LARGE"
    assert fetch_error(http.url("/chunked")).code == "IMAGE_TOO_LARGE"
    start = time.monotonic()
    quick = ImageLimits(max_bytes=LIMITS.max_bytes, url_timeout=1.0)
    assert fetch_error(http.url("/slow"), limits=quick).code == "IMAGE_FETCH_FAILED"
    assert time.monotonic() - start < 3
    assert fetch_error(http.url("/loop")).code == "IMAGE_FETCH_FAILED"
    assert fetch_error(http.url("/missing")).code == "IMAGE_FETCH_FAILED"


@pytest.fixture()
def https(tmp_path):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for the name "localhost" only."""
    import datetime
    import ssl

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with LoopbackHTTP() as server:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
        yield server, cert_file


def test_https_is_verified_against_the_host_name_while_connecting_to_the_checked_address(https, monkeypatch):
    server, cert_file = https
    data = encode(picture(12, 12))
    server.routes["/img.png"] = (200, {}, data)
    by_name = f"https://localhost:{server.port}/img.png"
    error = fetch_error(by_name)  # the certificate is not trusted yet
    assert error.code == "IMAGE_FETCH_FAILED" and "CERTIFICATE_VERIFY_FAILED" in error.message
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    assert fetch(by_name) == data
    error = fetch_error(f"https://127.0.0.1:{server.port}/img.png")  # the certificate does not name the IP
    assert error.code == "IMAGE_FETCH_FAILED" and "127.0.0.1" in error.message


def test_the_input_shape_is_bounded_before_the_fields_are_read():
    import base64

    from runners.worker.schema import MAX_DEPTH, check_shape, image_text_limit

    mime = base64.encodebytes(os.urandom(1000)).decode().replace("\n", "\r\n")  # line breaks every 76
    check_shape({"image_base64": mime, "prompt": "ünïcode ✓"}, max_image_bytes=1000)
    nested: list = []
    for _ in range(MAX_DEPTH):
        nested = [nested]
    for payload, field in [
        ({"image_base64": "A" * (image_text_limit(1000) + 1)}, "image_base64"),
        ({"images": nested}, "images" + "[0]" * (MAX_DEPTH - 1)),
        ({"prompt": "\ud800"}, "prompt"),
        ({"storage": {"\udfff": 1}}, "storage"),
        ({"seed": 2**64}, "seed"),
        ({"seed": b"bytes"}, "seed"),
        ({"a": [0] * 100_001}, "input"),
    ]:
        with pytest.raises(WorkerError) as info:
            check_shape(payload, max_image_bytes=1000)
        assert (info.value.code, info.value.field) == ("INVALID_INPUT", field), info.value


def test_a_name_server_that_never_answers_costs_no_more_than_the_time_limit(monkeypatch):
    """getaddrinfo stands in for a resolver that hangs: no real one can be pointed at here."""
    import threading

    answer = threading.Event()
    monkeypatch.setattr(images.socket, "getaddrinfo", lambda *args, **kwargs: answer.wait(60) and [])
    limits = ImageLimits(url_timeout=1.0)
    start = time.monotonic()
    try:
        with pytest.raises(WorkerError) as info:
            images.fetch_url("http://never-answers.example/a.png", "image_url", UrlPolicy(), limits)
    finally:
        answer.set()
    assert time.monotonic() - start < 30  # not the resolver's 60 s
    assert info.value.code == "IMAGE_FETCH_FAILED" and "time limit" in info.value.message
