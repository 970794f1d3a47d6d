"""Engines: the ONNX Runtime target lowering, INT4 blocks, timestep groups, engine folders,
the numpy DDIM sampler, and `generate` without torch."""

from __future__ import annotations

import collections
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from diffquant.cli import main
from diffquant.engines import BuildConfig, EnginesFromFolder, OrtEngine, build
from diffquant.engines.cpu import cpu_info
from diffquant.engines.ort import fit_weights
from diffquant.engines.scheduler import NumpyDDIM
from diffquant.eval import check_parity
from diffquant.exporters import export, lint
from diffquant.passes import load_recipe, quantize
from diffquant.quant import PerBlock, apply_plan
from diffquant.zoo.builtin import scheduler_config
from tests.conftest import make_tiny_dit, make_tiny_unet, tiny_calib
from tests.pipelines import BLOCK_TORCH


def _fused_ops(path: Path, tmp_path: Path) -> collections.Counter:
    o = ort.SessionOptions()
    o.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    o.log_severity_level = 3
    ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(o.optimized_model_filepath).graph.node)


def _export(make, bits, calib_cache, out, target="onnxruntime", groups=1):
    d = make()
    calib = tiny_calib(d, calib_cache)
    plan = quantize(d, load_recipe("minmax"), calib, bits=bits, progress=False, timestep_groups=groups)
    res = export(plan, d, out, target=target)
    return d, calib, plan, res


@pytest.mark.parametrize("make", [make_tiny_unet, make_tiny_dit], ids=["unet", "dit"])
def test_onnxruntime_target_fuses_and_matches_fake_quant(make, calib_cache, tmp_path):
    d, calib, plan, res = _export(make, "w8a8", calib_cache, tmp_path)
    model = onnx.load(str(res.qdq_onnx))
    assert lint(model).ok  # its own (onnxruntime) rules
    assert "q-type" in lint(model, target="tensorrt").rules()  # U8 activations are not for TensorRT
    ops = _fused_ops(res.qdq_onnx, tmp_path)
    assert ops["MatMulIntegerToFloat"] > 0
    if d.family == "unet":
        assert ops["QLinearConv"] > 0
    # the fake-quant model of this target requantizes conv outputs as the graph does
    fq = copy.deepcopy(d)
    apply_plan(fq.model, plan, target="onnxruntime")
    r = check_parity(fq, model, [(ts, calib.at(ts, 4)) for ts in calib.timesteps])
    assert r.weight_max_step_error == 0.0
    assert r.max_step_error <= 1.0, r.worst_tensors
    assert r.cosine_min > 0.999
    # and the fused kernels compute the same thing up to requantization rounding
    # (with S8 weights made exact for this CPU, as `diffquant build` does: see test_cpu_weights.py)
    inp = calib.at(calib.timesteps[0], 4)
    feeds = inp.numpy()
    here, _ = fit_weights(model, cpu_info())
    with OrtEngine(res.qdq_onnx) as ref, OrtEngine(here, qdq_fusion=True) as fused:
        a, b = ref.run(feeds)["noise_pred"], fused.run(feeds)["noise_pred"]
    assert (
        float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
    )  # (0.90 with U8S8 saturation)


def test_int4_block_weights_lower_to_matmulnbits(calib_cache, tmp_path):
    d, calib, plan, res = _export(make_tiny_unet, "w4g16a16", calib_cache, tmp_path)
    blocked = [lp for lp in plan.quantized_layers() if isinstance(lp.weight.granularity, PerBlock)]
    assert blocked and all(lp.op == "linear" for lp in blocked)
    assert any("not blocks" in n for lp in plan.quantized_layers() for n in lp.notes)  # convs fall back
    model = onnx.load(str(res.qdq_onnx))
    inits = {i.name: i for i in model.graph.initializer}
    for lp in blocked:
        assert inits[f"{lp.name}.weight_quantized"].data_type == onnx.TensorProto.INT4
    assert lint(model, target="tensorrt").ok or "int4-weight-only" in lint(model, target="tensorrt").rules()  # 16 < 64
    assert _fused_ops(res.qdq_onnx, tmp_path)["MatMulNBits"] == len(blocked)
    fq = copy.deepcopy(d)
    apply_plan(fq.model, plan)
    r = check_parity(fq, model, [(ts, calib.at(ts, 2)) for ts in calib.timesteps])
    assert r.weight_max_step_error == 0.0 and r.cosine_min > 0.999


def test_timestep_groups_export_one_graph_per_group(calib_cache, tmp_path):
    d, calib, plan, res = _export(make_tiny_unet, "w8a8", calib_cache, tmp_path, target="tensorrt", groups=2)
    assert [p.name for p in res.graphs] == ["unet.qdq.g0.onnx", "unet.qdq.g1.onnx"]
    lp = next(lp for lp in plan.quantized_layers() if lp.act)
    scales = plan.act_scale(lp.name)
    assert scales.shape == (2,) and scales[0] != scales[1]
    # same structure, group scales
    g0, g1 = (onnx.load(str(p)) for p in res.graphs)
    assert [n.op_type for n in g0.graph.node] == [n.op_type for n in g1.graph.node]
    fq = copy.deepcopy(d)
    apply_plan(fq.model, plan)
    for g, model in enumerate((g0, g1)):
        inputs = [(ts, calib.at(ts, 4)) for ts in calib.timesteps if plan.group_of(ts) == g]
        assert inputs
        r = check_parity(fq, model, inputs)
        assert r.max_step_error <= 1.0
    # a deep copy of the fake-quant model switches its own wrappers, not the original's
    from diffquant.quant.modules import quant_modules

    copied = copy.deepcopy(fq)
    ts1 = next(t for t in calib.timesteps if plan.group_of(t) == 1)
    with torch.no_grad():
        fq(**calib.at(next(t for t in calib.timesteps if plan.group_of(t) == 0), 1))
        copied(**calib.at(ts1, 1))
    assert {q.group for m in quant_modules(copied.model).values() for q in m.site_quantizers()} == {1}
    assert {q.group for m in quant_modules(fq.model).values() for q in m.site_quantizers()} == {0}
    # the engine folder switches graph by timestep (ONNX Runtime runs the tensorrt-target graphs too)
    out = build(res.graphs[0], tmp_path / "eng", BuildConfig(backend="onnxruntime"))
    engine, runtime = EnginesFromFolder(out)
    with engine, OrtEngine(res.graphs[1]) as only_g1:
        ts = next(t for t in calib.timesteps if plan.group_of(t) == 1)
        inp = calib.at(ts, 2)
        feeds = inp.numpy()
        np.testing.assert_allclose(
            engine.run(feeds)["noise_pred"], only_g1.run(feeds)["noise_pred"], rtol=1e-3, atol=1e-3
        )
    assert [g.file for g in runtime.graphs] == ["unet.qdq.g0.onnx", "unet.qdq.g1.onnx"]


@pytest.mark.parametrize(
    "cfg",
    [
        scheduler_config(),
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
    ],
)
def test_numpy_ddim_matches_diffusers(cfg):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(20)
    ours = NumpyDDIM(cfg)
    assert np.array_equal(ours.timesteps(20), ref.timesteps.numpy())
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    for t in ours.timesteps(20):
        eps = np.random.default_rng(int(t)).standard_normal(x.shape).astype(np.float32)
        want = ref.step(torch.from_numpy(eps), int(t), torch.from_numpy(x)).prev_sample.numpy()
        x = ours.step(eps, int(t), x, 20)
        np.testing.assert_allclose(x, want, atol=1e-4)


@pytest.mark.parametrize("make", [make_tiny_unet, make_tiny_dit], ids=["unet", "dit"])
def test_build_and_generate_without_torch(make, calib_cache, tmp_path):
    _, _, _, res = _export(make, "w8a8", calib_cache, tmp_path / "run")
    assert main(["build", str(res.qdq_onnx), "--backend", "onnxruntime", "--out", str(tmp_path / "eng")]) == 0
    png = tmp_path / "sevens.png"
    cmd = [
        sys.executable,
        "-c",
        BLOCK_TORCH,
        "generate",
        str(tmp_path / "eng"),
        "--prompt",
        "7",
        "-n",
        "3",
        "--steps",
        "4",
        "--out",
        str(png),
        "--quiet",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert p.returncode == 0, p.stderr
    from PIL import Image

    assert Image.open(png).size[0] > 0
    # an unknown prompt is a clear error, exit 2
    p = subprocess.run(cmd[:6] + ["eleven"] + cmd[7:], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert p.returncode == 2 and "does not know the prompt 'eleven'" in p.stderr and "Traceback" not in p.stderr


def test_engine_folder_errors(calib_cache, tmp_path, capsys):
    _, _, _, res = _export(make_tiny_unet, "w8a8", calib_cache, tmp_path / "run")
    # an onnxruntime-target graph is refused for TensorRT, before anything is written
    assert main(["build", str(res.qdq_onnx), "--backend", "tensorrt", "--out", str(tmp_path / "trt")]) == 2
    assert "lowered for the onnxruntime target" in capsys.readouterr().err and not (tmp_path / "trt").exists()
    out = build(res.qdq_onnx, tmp_path / "eng", BuildConfig())
    # the folder exists: refuse to overwrite
    assert main(["build", str(res.qdq_onnx), "--out", str(out)]) == 2
    # a changed graph no longer matches engine.json
    (out / "unet.qdq.onnx").write_bytes((out / "unet.qdq.onnx").read_bytes() + b"\x00")
    assert main(["generate", str(out), "--prompt", "1", "-n", "1", "--quiet"]) == 2
    assert "changed since it was built" in capsys.readouterr().err
    (out / "unet.qdq.onnx").unlink()
    assert main(["generate", str(out), "--prompt", "1", "-n", "1", "--quiet"]) == 2
    assert "is missing" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "1"]) == 2
    assert "not an engine folder" in capsys.readouterr().err


def test_build_refuses_graph_that_fails_lint(calib_cache, tmp_path, capsys):
    _, _, _, res = _export(make_tiny_unet, "w8a8", calib_cache, tmp_path / "run", target="tensorrt")
    model = onnx.load(str(res.qdq_onnx))
    zp = next(i for i in model.graph.initializer if i.name.endswith(".act_zero_point"))
    zp.CopyFrom(onnx.numpy_helper.from_array(np.array(3, np.int8), zp.name))
    onnx.save(model, str(res.qdq_onnx))
    assert main(["build", str(res.qdq_onnx), "--out", str(tmp_path / "eng")]) == 2
    err = capsys.readouterr().err
    assert "zero-point" in err and "nothing written" in err and not (tmp_path / "eng").exists()


def test_build_tensorrt_says_how_to_get_it(calib_cache, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; tests/gpu covers the build")
    except ImportError:
        pass
    _, _, _, res = _export(make_tiny_unet, "w8a8", calib_cache, tmp_path / "run", target="tensorrt")
    assert main(["build", str(res.qdq_onnx), "--backend", "tensorrt", "--out", str(tmp_path / "trt")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "pypi.nvidia.com" in err and not (tmp_path / "trt").exists()


def test_validate_run_folder(calib_cache, tmp_path):
    from diffquant.eval.validate import ValidateConfig, validate

    d, calib, plan, res = _export(make_tiny_unet, "w8a8", calib_cache, tmp_path, target="tensorrt")
    plan.save(tmp_path / "plan")
    report = {
        "model": "tiny",
        "target": "tensorrt",
        "onnx": str(res.qdq_onnx),
        "graphs": [str(res.qdq_onnx)],
        "timestep_groups": [],
        "settings": {},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    inputs = [(ts, calib.at(ts, 2)) for ts in calib.timesteps]
    r = validate(tmp_path, d, inputs, ValidateConfig(against=["fp", "fake-quant", "tensorrt"], progress=False))
    comps = {row.comparison for row in r.rows}
    assert comps == {"fp", "fake-quant"}
    assert all(row.passed for row in r.rows if row.comparison == "fp")
    assert "tensorrt" in r.not_run or "tensorrt" in comps
    if "tensorrt" in r.not_run:  # asked for and could not run: not a pass
        assert not r.passed and r.verdict == "NOT RUN" and "not run" in r.table()
    saved = json.loads((tmp_path / "validate.json").read_text())
    assert len(saved["rows"]) == len(r.rows) == 6
    assert (tmp_path / "validate_inputs.json").exists()
    # an impossible threshold fails and names the timestep, the output and how to look closer
    strict = validate(
        tmp_path,
        d,
        inputs[:1],
        ValidateConfig(against=["fake-quant"], thresholds={"fake-quant": {"cosine": 1.0001}}, progress=False),
    )
    assert not strict.passed and "fails at timestep" in strict.hints()[0] and "noise_pred" in strict.hints()[0]
