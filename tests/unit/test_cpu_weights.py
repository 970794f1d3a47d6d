"""ISA-aware ONNX Runtime weights: the int16 pair-sum rule (emulated in numpy, so the decision is
tested on every CPU), S8 -> U8 rewrites that change no value, 7-bit reduce_range plans, and the
real saturation on whichever CPU runs the test."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from diffquant.cli import main
from diffquant.engines import BuildConfig, EnginesFromFolder, OrtEngine, build
from diffquant.engines.cpu import PAIRSUM_SAFE_CODE, CpuInfo, cpu_info, full_range, pairsum_int16, saturates
from diffquant.engines.ort import fit_weights
from diffquant.errors import DiffquantError
from diffquant.eval import check_parity
from diffquant.exporters import export
from diffquant.passes import load_recipe, quantize
from diffquant.quant import PerAxis, apply_plan, reduce_range
from tests.conftest import make_tiny_unet, tiny_calib

AVX2 = CpuInfo("an AVX2 CPU", "x86_64", ["avx2"])
VNNI = CpuInfo("an AVX-512 VNNI CPU", "x86_64", ["avx2", "avx512f", "avx512_vnni"])


def test_pairsum_emulation_is_exact_within_the_safe_codes_and_saturates_beyond():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 96), dtype=np.uint8)
    a[0] = 255  # the worst case: every activation at the top of the U8 range
    safe = rng.integers(-PAIRSUM_SAFE_CODE, PAIRSUM_SAFE_CODE + 1, (16, 96)).astype(np.int8)
    safe[0] = PAIRSUM_SAFE_CODE
    exact = a.astype(np.int32) @ safe.astype(np.int32).T
    assert np.array_equal(pairsum_int16(a, safe), exact)
    assert not full_range(safe)
    wide = rng.integers(-127, 128, (16, 96)).astype(np.int8)
    wide[0] = 127
    assert full_range(wide)
    assert not np.array_equal(pairsum_int16(a, wide), a.astype(np.int32) @ wide.astype(np.int32).T)
    # one code past the safe range saturates a pair at a = 255
    pair = np.array([[PAIRSUM_SAFE_CODE + 1, PAIRSUM_SAFE_CODE + 1]], np.int8)
    assert pairsum_int16(np.full((1, 2), 255, np.uint8), pair)[0, 0] == 32767 != 255 * 2 * (PAIRSUM_SAFE_CODE + 1)


def test_saturation_decision_follows_the_isa(tmp_path):
    wide = np.array([[127, -3]], np.int8)
    assert saturates(wide, AVX2) and not saturates(wide, VNNI)
    assert not saturates(np.array([[64, -64]], np.int8), AVX2)
    assert (
        CpuInfo("Arm", "aarch64", ["asimddp"]).int32_dot and CpuInfo("Arm without dot product", "aarch64", []).int32_dot
    )
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n"
    )
    cpu = cpu_info(info)
    assert cpu.model == "Test CPU 9000" and cpu.flags == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert cpu.int32_dot and cpu.bf16


@pytest.fixture(scope="module")
def tiny_ort(calib_cache, tmp_path_factory):
    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    plan = quantize(d, load_recipe("minmax"), calib, bits="w8a8", progress=False)
    res = export(plan, d, tmp_path_factory.mktemp("ort"), target="onnxruntime")
    return d, calib, plan, res


def _codes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith(".weight_quantized")}


def test_fit_weights_rewrites_exactly_what_would_saturate(tiny_ort):
    d, calib, plan, res = tiny_ort
    model = onnx.load(str(res.qdq_onnx))
    codes = _codes(model)
    assert all(c.dtype == np.int8 for c in codes.values()) and any(full_range(c) for c in codes.values())
    same, counts = fit_weights(model, VNNI)
    assert same is model and counts["u8"] == 0 and counts["full_range_s8"] > 0
    fitted, counts = fit_weights(model, AVX2)
    new = _codes(fitted)
    assert counts["u8"] == sum(full_range(c) for c in codes.values()) and counts["full_range_s8"] == 0
    for name, c in codes.items():
        assert new[name].dtype == (np.uint8 if full_range(c) else np.int8)
    # the same grid: plain Q/DQ semantics give identical outputs
    feeds = calib.at(calib.timesteps[0], 2).numpy()
    with OrtEngine(model) as a, OrtEngine(fitted) as b:
        assert np.array_equal(a.run(feeds)["noise_pred"], b.run(feeds)["noise_pred"])
    with pytest.raises(DiffquantError, match="saturating int16.*--reduce-range"):
        fit_weights(model, AVX2, "s8")
    assert fit_weights(model, VNNI, "u8")[1] == {"s8": 0, "u8": len(codes), "full_range_s8": 0}


def test_build_records_the_cpu_and_u8_mode_runs(tiny_ort, tmp_path, capsys):
    d, calib, plan, res = tiny_ort
    assert main(["build", str(res.qdq_onnx), "--weights", "u8", "--out", str(tmp_path / "u8")]) == 0
    assert "rewritten to U8" in capsys.readouterr().out
    meta = json.loads((tmp_path / "u8" / "engine.json").read_text())
    assert meta["cpu"]["model"] == cpu_info().model and meta["engines"][0]["weights"]["s8"] == 0
    auto = build(res.qdq_onnx, tmp_path / "auto", BuildConfig())
    feeds = calib.at(calib.timesteps[0], 2).numpy()
    (e1, _), (e2, _) = EnginesFromFolder(tmp_path / "u8"), EnginesFromFolder(auto)
    with e1, e2:
        a, b = e1.run(feeds)["noise_pred"], e2.run(feeds)["noise_pred"]
    assert float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
    # a folder that keeps full-range S8 weights is refused on a CPU without int32 dot products
    meta = json.loads((auto / "engine.json").read_text())
    if not cpu_info().int32_dot:
        assert meta["engines"][0]["weights"]["full_range_s8"] == 0  # auto rewrote them here
    else:
        assert meta["engines"][0]["weights"]["full_range_s8"] > 0


def test_reduce_range_plan_is_exact_in_s8_everywhere(tiny_ort, tmp_path):
    d, calib, plan, _ = tiny_ort
    small = reduce_range(plan)
    assert all(
        lp.weight.bits == 7
        for lp in small.quantized_layers()
        if lp.weight and isinstance(lp.weight.granularity, PerAxis)
    )
    assert all(lp.weight.bits == 8 for lp in plan.quantized_layers() if lp.weight)  # the original is untouched
    res = export(small, d, tmp_path, target="onnxruntime")
    model = onnx.load(str(res.qdq_onnx))
    assert not any(full_range(c) for c in _codes(model).values())
    assert fit_weights(model, AVX2, "s8")[1]["u8"] == 0
    fq = copy.deepcopy(d)
    apply_plan(fq.model, small, target="onnxruntime")
    r = check_parity(fq, model, [(ts, calib.at(ts, 2)) for ts in calib.timesteps])
    assert r.weight_max_step_error == 0.0 and r.max_step_error <= 1.0


def test_s8_full_range_weights_on_this_cpu(tiny_ort):
    """The real kernels: exact with VNNI; without it, full-range S8 weights saturate (this is
    why `build` rewrites them). One branch runs on any machine."""
    d, calib, plan, res = tiny_ort
    feeds = calib.at(calib.timesteps[0], 4).numpy()
    with OrtEngine(res.qdq_onnx) as ref, OrtEngine(res.qdq_onnx, qdq_fusion=True) as fused:
        a, b = ref.run(feeds)["noise_pred"], fused.run(feeds)["noise_pred"]
    cos = float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
    if cpu_info().int32_dot:
        assert cos > 0.99, f"{cpu_info().describe()}: S8 kernels should be exact here"
    else:
        fitted, _ = fit_weights(onnx.load(str(res.qdq_onnx)), cpu_info())
        with OrtEngine(fitted, qdq_fusion=True) as good:
            c = good.run(feeds)["noise_pred"]
        assert float(np.dot(a.ravel(), c.ravel()) / np.linalg.norm(a) / np.linalg.norm(c)) > cos
