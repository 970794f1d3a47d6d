"""TensorRT backend: build a strongly typed engine from the exported Q/DQ graph, run it, and
compare with ONNX Runtime (fusion off). Runs only where `tensorrt` imports and a GPU exists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffquant.engines import BuildConfig, EnginesFromFolder, OrtEngine, build
from diffquant.errors import DiffquantError
from diffquant.exporters import export
from diffquant.passes import load_recipe, quantize
from tests.conftest import make_tiny_unet, tiny_calib

try:
    from diffquant.engines.tensorrt import TrtBuildConfig, import_tensorrt

    import_tensorrt()
    HAVE_TRT, WHY = True, ""
except DiffquantError as e:
    HAVE_TRT, WHY = False, f"TensorRT is not importable here ({str(e).split('. ')[0]}); run in docker/Dockerfile"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_TRT, reason=WHY)]


@pytest.fixture
def exported(calib_cache, tmp_path):
    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    plan = quantize(d, load_recipe("minmax"), calib, bits="w8a8", progress=False)
    return export(plan, d, tmp_path / "run", target="tensorrt"), calib


def test_build_run_and_compare_with_ort(exported, tmp_path):
    res, calib = exported
    out = build(
        res.qdq_onnx,
        tmp_path / "eng",
        BuildConfig(
            backend="tensorrt",
            settings=TrtBuildConfig(batch=4, dynamic=True, max_batch=8, timing_cache_dir=str(tmp_path / "tc")),
        ),
    )
    meta = json.loads((out / "engine.json").read_text())
    entry = meta["engines"][0]
    assert entry["tensorrt"] and entry["gpu"] and entry["onnx_sha256"] and entry["profile"]["sample"][2][0] == 8
    assert list((tmp_path / "tc").glob("timing-*.cache"))
    engine, _ = EnginesFromFolder(out)
    with engine, OrtEngine(res.qdq_onnx) as ref:
        for ts in calib.timesteps:
            inp = calib.at(ts, 4)
            feeds = inp.numpy()
            a = ref.run(feeds)["noise_pred"].astype(np.float32)
            b = engine.run(feeds)["noise_pred"].astype(np.float32)
            cos = float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))
            assert cos > 0.99, (ts, cos)


def test_engine_for_another_gpu_is_refused(exported, tmp_path):
    res, _ = exported
    out = build(res.qdq_onnx, tmp_path / "eng", BuildConfig(backend="tensorrt"))
    meta = json.loads((out / "engine.json").read_text())
    meta["engines"][0]["gpu"] = "Some Other GPU"
    (out / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(DiffquantError, match="does not match this machine"):
        EnginesFromFolder(out)


def test_pipeline_folder_on_tensorrt_draws_what_onnxruntime_draws(tmp_path):
    """The whole pipeline (FP16 text encoder and VAE decoder engines, FP32 denoiser) against the
    same folder built for ONNX Runtime (FP16 parts up-cast): the images agree to FP16 rounding."""
    from diffquant.engines.deployed import PipelineFromFolder, PipelineRequest
    from diffquant.engines.runtime import GenerateConfig
    from tests.pipelines import export_tiny

    _, _, exp = export_tiny("sd", tmp_path, ["a red cat", "a blue dog"], target="tensorrt")
    trt = build(
        exp,
        tmp_path / "trt",
        BuildConfig(
            backend="tensorrt", denoiser="fp", settings=TrtBuildConfig(batch=2, timing_cache_dir=str(tmp_path / "tc"))
        ),
    )
    ort = build(exp, tmp_path / "ort", BuildConfig(backend="onnxruntime", denoiser="fp"))
    assert {p["runner"] for p in json.loads((trt / "engine.json").read_text())["parts"].values()} == {"tensorrt"}
    req = PipelineRequest(["a red cat"], 2, ["a blue dog"], GenerateConfig(steps=4, guidance=5.0, seed=0))
    with PipelineFromFolder(trt) as a, PipelineFromFolder(ort) as b:
        x, y = a(req), b(req)
    mse = float((((x - y) / 2) ** 2).mean())
    assert 10 * np.log10(1 / max(mse, 1e-12)) > 35
