"""What a picture records about what made it: file hashes (cached), input pictures, the pipeline."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from PIL import Image

from qwen_edit import provenance


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_EDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "qwen-edit" / "digests.json"


def test_a_file_is_hashed_once_until_it_changes(tmp_path, cache, monkeypatch):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
    assert provenance.file_digest(model) == expected and cache.is_file()

    def no_reading(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(provenance, "_sha256", no_reading)
    assert provenance.file_digest(model) == expected  # from the cache
    model.write_bytes(b"other weights" * 1000)
    os.utime(model, ns=(1, 1))  # a new size and time: hashed again
    with pytest.raises(AssertionError, match="read again"):
        provenance.file_digest(model)

    monkeypatch.undo()
    cache.write_text("not json")  # a damaged cache only costs a hash
    assert provenance.file_digest(model) == hashlib.sha256(model.read_bytes()).hexdigest()[:12]


def test_pictures_by_file_bytes_or_pixels(tmp_path):
    image = Image.new("RGB", (8, 4), (1, 2, 3))
    image.save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    by_file = provenance.picture_entry(str(tmp_path / "a.png"))
    assert by_file == {"file": str(tmp_path / "a.png"), "sha256": hashlib.sha256(data).hexdigest()[:12]}
    assert provenance.picture_entry(data) == {"sha256": by_file["sha256"]}
    pixels = provenance.picture_entry(image)
    assert set(pixels) == {"sha256"} and pixels != provenance.picture_entry(Image.new("RGB", (8, 4)))


def test_read_metadata_of_pictures_with_and_without_it():
    from qwen_edit.conditioning import encode_image

    image = Image.new("RGB", (8, 8))
    assert provenance.read_metadata(encode_image(image, "PNG", {"prompt": "p", "seed": 1})) == {
        "prompt": "p",
        "seed": 1,
    }
    assert provenance.read_metadata(encode_image(image, "JPEG")) == {}
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    assert provenance.read_metadata(buffer.getvalue()) == {}


def test_a_pipeline_by_names_and_hashes_never_paths(demo_dir, cache):
    from qwen_edit import QwenEditPipeline

    pipe = QwenEditPipeline.demo(cache_dir=demo_dir)
    found = provenance.pipeline_provenance(pipe)
    assert found["models"]["transformer"] == {
        "file": "svdq-int4_r16-demo.safetensors",
        "sha256": provenance.file_digest(demo_dir / "svdq-int4_r16-demo.safetensors"),
    }
    assert (found["backend"], found["compute"], found["device"], found["demo"]) == (
        "portable",
        "bf16",
        "cpu",
        True,
    )
    assert found["models"]["loras"] == [] and str(demo_dir) not in repr(found)
