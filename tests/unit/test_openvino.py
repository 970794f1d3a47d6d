"""OpenVINO backend: build from the tensorrt-target Q/DQ graph, engine.json, the compiled blob,
parity against fake-quant, dynamic batch, torch-free generate, and `validate --against openvino`.
Skipped where OpenVINO is not installed (pip install 'diffquant[openvino]')."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'diffquant[openvino]')")

from diffquant.cli import main  # noqa: E402
from diffquant.engines import BuildConfig, EnginesFromFolder, build  # noqa: E402
from diffquant.engines.openvino import OvBuildConfig, OvEngine  # noqa: E402
from diffquant.errors import DiffquantError  # noqa: E402
from diffquant.exporters import export  # noqa: E402
from diffquant.passes import load_recipe, quantize  # noqa: E402
from diffquant.quant import apply_plan  # noqa: E402
from tests.conftest import make_tiny_dit, make_tiny_unet, tiny_calib  # noqa: E402
from tests.unit.test_engines import BLOCK_TORCH  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("make", [make_tiny_unet, make_tiny_dit], ids=["unet", "dit"])
def test_openvino_engine_matches_fake_quant(make, calib_cache, tmp_path):
    d = make()
    calib = tiny_calib(d, calib_cache)
    plan = quantize(d, load_recipe("minmax"), calib, bits="w8a8", progress=False)
    res = export(plan, d, tmp_path / "run", target="tensorrt")
    out = build(
        res.qdq_onnx, tmp_path / "ov", BuildConfig(backend="openvino", settings=OvBuildConfig(batch=4, threads=2))
    )
    meta = json.loads((out / "engine.json").read_text())
    e = meta["engines"][0]
    import openvino

    assert e["openvino"] == openvino.__version__ and e["device"] == "CPU" and e["precision"] in ("f32", "bf16", "f16")
    assert meta["cpu"]["model"] and (out / e["blob"]).stat().st_size > 0 and (out / e["ir"]).exists()
    assert all(opt[0] == 4 for _, opt, _ in e["profile"].values() if len(opt) > 1) and e["build"]["hint"] == "LATENCY"
    fq = copy.deepcopy(d)
    apply_plan(fq.model, plan, target="tensorrt")
    engine, _ = EnginesFromFolder(out)
    with engine:
        assert not engine.engines[0].recompiled  # the blob was imported
        for ts in calib.timesteps:
            inp = calib.at(ts, 4)
            with torch.no_grad():
                want = fq(**inp).numpy()
            got = engine.run(inp.numpy())["noise_pred"]
            assert got.shape == want.shape and _cos(want, got) > 0.99
    # a blob from another machine is not trusted: the IR is compiled again, to the same result
    with OvEngine(out / e["file"], dict(e, cpu="another CPU")) as again:
        assert "cpu" in again.recompiled
        assert _cos(again.run(inp.numpy())["noise_pred"], got) > 0.999
    # changed weights are refused
    bin_file = (out / e["file"]).with_suffix(".bin")
    data = bin_file.read_bytes()
    bin_file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(DiffquantError, match="changed since it was built"):
        EnginesFromFolder(out)


def test_openvino_dynamic_batch_generate_and_validate(calib_cache, tmp_path, capsys):
    from diffquant.eval.validate import ValidateConfig, validate

    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    plan = quantize(d, load_recipe("minmax"), calib, bits="w8a8", progress=False)
    run = tmp_path / "run"
    res = export(plan, d, run, target="tensorrt")
    assert (
        main(
            [
                "build",
                str(res.qdq_onnx),
                "--backend",
                "openvino",
                "--dynamic",
                "--max-batch",
                "8",
                "--threads",
                "1",
                "--out",
                str(tmp_path / "ov"),
            ]
        )
        == 0
    )
    assert "OpenVINO" in capsys.readouterr().out
    engine, _ = EnginesFromFolder(tmp_path / "ov")
    with engine:
        for b in (1, 6):
            assert engine.run(calib.at(calib.timesteps[0], b).numpy())["noise_pred"].shape[0] == b
    png = tmp_path / "ov.png"
    cmd = [
        sys.executable,
        "-c",
        BLOCK_TORCH,
        "generate",
        str(tmp_path / "ov"),
        "--prompt",
        "3",
        "-n",
        "2",
        "--steps",
        "3",
        "--out",
        str(png),
        "--quiet",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert p.returncode == 0, p.stderr
    assert png.stat().st_size > 0
    # validate --against openvino builds an engine in the run folder and compares it with fake-quant
    plan.save(run / "plan")
    report = {
        "model": "tiny",
        "target": "tensorrt",
        "onnx": str(res.qdq_onnx),
        "graphs": [str(res.qdq_onnx)],
        "timestep_groups": [],
        "settings": {},
    }
    (run / "report.json").write_text(json.dumps(report))
    r = validate(
        run, d, [(ts, calib.at(ts, 2)) for ts in calib.timesteps], ValidateConfig(against=["openvino"], progress=False)
    )
    assert {row.comparison for row in r.rows} == {"openvino"} and r.passed, r.table()
    assert (run / "engine-openvino" / "engine.json").exists()
