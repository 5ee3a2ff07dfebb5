"""Background reading of model files into the page cache (qwen_edit.prefetch)."""

from __future__ import annotations

from pathlib import Path

from qwen_edit import prefetch


def test_reads_files_and_folders_in_order(tmp_path, monkeypatch):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x" * (3 * prefetch.CHUNK // 2))
    folder = tmp_path / "encoder"
    (folder / "sub").mkdir(parents=True)
    for name in ("model-00002.safetensors", "model-00001.safetensors", "sub/config.json"):
        (folder / name).write_bytes(b"y" * 10)
    files = prefetch.model_files([a, None, folder, tmp_path / "missing"])
    assert files == [a, folder / "model-00001.safetensors", folder / "model-00002.safetensors"]
    read: dict[str, int] = {}

    class CountingFile:  # `open` as prefetch uses it; every byte read goes through readinto
        def __init__(self, path, *args, **kwargs):
            self.name, self.file = Path(path).name, open(path, *args, **kwargs)  # noqa: SIM115

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def readinto(self, buffer):
            n = self.file.readinto(buffer)
            read[self.name] = read.get(self.name, 0) + n
            return n

    monkeypatch.setattr(prefetch, "open", CountingFile, raising=False)
    thread = prefetch.start_prefetch([a, folder], available=10 * a.stat().st_size)
    assert thread is not None and thread.daemon
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert list(read) == [f.name for f in files] and all(read[f.name] == f.stat().st_size for f in files)


def test_skipped_when_memory_is_short_or_unknown(tmp_path):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x" * 1000)
    assert prefetch.start_prefetch([a], available=1000) is None  # needs 1.5x the bytes free
    assert prefetch.start_prefetch([a], available=None) is None
    assert prefetch.start_prefetch([tmp_path / "missing"], available=10**12) is None


def test_an_unreadable_file_ends_the_reading_quietly(tmp_path, caplog):
    """A file that vanished between the listing and the read: logged, no exception in the thread."""
    import logging

    with caplog.at_level(logging.INFO, logger="qwen_edit.prefetch"):
        prefetch._read_all([tmp_path / "gone.safetensors"])
    assert "stopped at" in caplog.text and "gone.safetensors" in caplog.text
