"""A smoke `diffquant run` on the builtin digits-sd model at small N."""

import json

import pytest

from diffquant.cli import main


@pytest.mark.e2e
def test_smoke_run_digits_sd(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            "builtin:digits-sd",
            "--recipe",
            "minmax",
            "--bits",
            "w8a8",
            "--out",
            str(out),
            "--samples",
            "20",
            "--steps",
            "10",
            "--calib-samples",
            "8",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr()
    r = json.loads((out / "report.json").read_text())
    for key in ("model", "recipe", "bits", "target", "onnx"):
        assert key in r
    assert r["bits"] == "w8a8" and r["target"] == "tensorrt"
    p, q = r["parity"], r["quality"]
    assert p["max_step_error"] <= 1.0 and p["cosine_min"] >= 0.99
    for side in ("fp", "quant", "fake_quant"):
        assert q[side]["fd"] >= 0 and 0 <= q[side]["accuracy"] <= 1
    assert q["quant"]["psnr"] > 15 and 0 < q["quant"]["ssim"] <= 1
    assert set(r["timings"]) == {"calibrate_s", "quantize_s", "export_s", "parity_s", "evaluate_s"}
    for f in ("unet.qdq.onnx", "unet.fp32.onnx", "report.md", "samples_compare.png", "plan/plan.json"):
        assert (out / f).exists(), f
    assert "N = 20 is too small for FD to mean much" in (out / "report.md").read_text()
    assert main(["lint", str(out / "unet.qdq.onnx")]) == 0


@pytest.mark.e2e
def test_smoke_qdiffusion_run_digits_dit(tmp_path, monkeypatch, capsys):
    # the reconstruction recipe end to end on a real builtin model, iterations cut by --set
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            "builtin:digits-dit",
            "--recipe",
            "qdiffusion",
            "--bits",
            "w4a8",
            "--target",
            "onnxruntime",
            "--set",
            "reconstruct.iters=20",
            "--set",
            "reconstruct.samples=64",
            "--out",
            str(out),
            "--samples",
            "20",
            "--steps",
            "10",
            "--calib-samples",
            "8",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr()
    r = json.loads((out / "report.json").read_text())
    assert r["recipe"] == "qdiffusion" and r["parity"]["max_step_error"] <= 1.0
    plan = json.loads((out / "plan" / "plan.json").read_text())
    assert plan["recipe"]["passes"][-1]["config"]["iters"] == 20
    assert all(any(n.startswith("reconstructed in unit") for n in lp["notes"]) for lp in plan["layers"] if lp["sites"])
    assert not (tmp_path / "cache" / "reconstruct").exists() or not any((tmp_path / "cache" / "reconstruct").iterdir())


@pytest.mark.e2e
def test_smoke_dmq_run_digits_sd(tmp_path, monkeypatch, capsys):
    # DMQ end to end on the UNet (PTS needs its skip convs), iterations cut by --set
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            "builtin:digits-sd",
            "--recipe",
            "dmq",
            "--bits",
            "w4a8",
            "--target",
            "onnxruntime",
            "--set",
            "les.iters=5",
            "--set",
            "les.samples=32",
            "--set",
            "reconstruct.iters=5",
            "--set",
            "reconstruct.samples=32",
            "--set",
            "pts.samples=64",
            "--out",
            str(out),
            "--samples",
            "20",
            "--steps",
            "10",
            "--calib-samples",
            "8",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr()
    r = json.loads((out / "report.json").read_text())
    assert r["recipe"] == "dmq" and r["parity"]["max_step_error"] <= 1.0
    realized = json.loads((out / "realized.json").read_text())["layers"]
    assert any(v.get("act_multiplier", "").startswith("folded into") for v in realized.values())
    assert any("power-of-two" in v["weight"] for v in realized.values())


@pytest.mark.e2e
def test_smoke_mpqdm_run_digits_sd(tmp_path, monkeypatch, capsys):
    # MPQ-DM end to end at its default W2A4: OMQ's mixed grids and the merged LoRA deploy as
    # four timestep-group graphs that keep parity; the report renders the passes' tables
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            "builtin:digits-sd",
            "--recipe",
            "mpqdm",
            "--target",
            "onnxruntime",
            "--set",
            "omq.samples=32",
            "--set",
            "efficientdm.iters=10",
            "--set",
            "efficientdm.steps=5",
            "--out",
            str(out),
            "--samples",
            "20",
            "--steps",
            "10",
            "--calib-samples",
            "8",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr()
    r = json.loads((out / "report.json").read_text())
    assert r["recipe"] == "mpqdm" and r["bits"] == "w2a4" and r["parity"]["max_step_error"] <= 1.0
    assert len(r["graphs"]) == 4 and r["plan_bits"]["act_bits"] == [4, 8]
    md = (out / "report.md").read_text()
    assert "Outlier-driven mixed quantization" in md and "Low-rank distillation" in md
    assert main(["lint", r["graphs"][0]]) == 0


@pytest.mark.e2e
def test_demo_is_the_run_it_says_it_is(tmp_path, monkeypatch, capsys):
    # the README's first command: every run option at its default, labelled grids, the next step printed
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--samples", "10", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert (
        "(the same as: diffquant run --model builtin:digits-sd" in printed
        and f"next: diffquant build {out} --out" in printed
    )
    r = json.loads((out / "report.json").read_text())
    assert r["recipe"] == "minmax" and r["bits"] == "w8a8" and r["parity"]["passed"] and r["reduce_range"] is False
    assert (out / "samples_compare.png").exists()
