"""The benchmark harness on the tiny demo model (CPU): its JSON and chart formats."""

from __future__ import annotations

import json

from PIL import Image

from runners.bench import STAGES, run


def test_harness_output_format(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_EDIT_CACHE", str(tmp_path / "cache"))
    out, chart = tmp_path / "b.json", tmp_path / "b.png"
    args = "--demo --device cpu --size 48 --steps 2 --warmup 0 --repeats 2 --compute bf16 fp8".split()  # noqa: SIM905
    args += ["--text-encoder-compute", "fp8"]
    result = run([*args, "--json", str(out), "--chart", str(chart)])
    assert json.loads(out.read_text()) == result
    assert {
        "card",
        "torch",
        "size",
        "steps",
        "model_bytes",
        "disk_read_gb_s",
        "cold_start_floor_s",
        "rows",
    } <= set(result)
    assert [r["config"] for r in result["rows"]] == ["portable/bf16/encoder-fp8", "portable/fp8/encoder-fp8"]
    for row in result["rows"]:
        assert row["compute"] in ("bf16", "fp8") and row["backend"] == "portable"
        assert row["text_encoder_compute"] == "fp8"
        medians = row["median_ms"]
        assert all(medians[k] > 0 for k in (*STAGES, "step", "total"))
        assert medians["steps"] >= 2 * medians["step"] * 0.5  # two steps per edit
        assert medians["total"] >= sum(medians[k] for k in STAGES) * 0.99
        assert row["cold_start_s"] >= row["load_s"] > 0
        phases = row["load_phases_s"]
        assert list(phases) == ["imports", "plan", "transformer", "text_encoder", "tokenizer", "vae"]
        assert sum(phases.values()) <= row["load_s"] * 1.01
    assert result["rows"][1]["compute"] == "fp8"
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.size[0] == 900
