"""The engine folder as a whole pipeline, on tiny random-weight pipelines of every text-to-image
family: the exported text encoders + tokenizers + composition reproduce the pipeline's own
`encode_prompt`, the FP-engine folder draws the diffusers pipeline's images (PSNR >= 40 dB),
`generate` runs torch-free from free text on every family, and bad requests are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffquant.artifacts import RuntimeSpec
from diffquant.cli import main
from diffquant.engines.build import BuildConfig, build
from diffquant.engines.deployed import PipelineFromFolder, PipelineRequest
from diffquant.engines.ort import OrtEngine
from diffquant.engines.runtime import GenerateConfig
from diffquant.engines.text import TextConditioner
from diffquant.errors import DiffquantError
from diffquant.eval.pipeline_parity import PipelineCheckConfig, compare_pipeline
from diffquant.exporters.parts import PartsConfig, export_parts
from diffquant.models.loading import load_pipeline
from tests.pipelines import BLOCK_TORCH, export_tiny

TEXT_FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux")
RESOLUTION = {"flux": (32, 32)}
PROMPTS = ["a red cat", "a blue dog"]  # the tiny T5 vocabulary covers these letters


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (pipeline folder, denoiser, export folder): minmax W8A8, onnxruntime target."""
    root = tmp_path_factory.mktemp("parts")
    return {fam: export_tiny(fam, root, PROMPTS, RESOLUTION.get(fam)) for fam in TEXT_FAMILIES}


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_parts_reproduce_encode_prompt(family, exported):
    folder, d, exp = exported[family]
    runtime = RuntimeSpec.read(exp)
    parts = json.loads((exp / "parts.json").read_text())["parts"]
    assert all(p["ok"] and p["dtype"] == "float32" for p in parts), parts
    assert all(p["tokenizer_identical"] for p in parts if p["name"].startswith("text_encoder"))
    engines = {e.component: OrtEngine(exp / e.file) for e in runtime.text.encoders}
    text = TextConditioner(exp, runtime.text, engines)
    ours = text(PROMPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = d.family.encode(load_pipeline(folder), PROMPTS)  # the pipeline's own encode_prompt, null row last
    for name, rows in ours.items():
        np.testing.assert_allclose(rows, theirs[name][: len(PROMPTS)].detach().numpy(), atol=1e-4, err_msg=name)
    neg = text.negative(None, 1)  # no negative prompt: the pipeline's own unconditional row
    for name, rows in neg.items():
        np.testing.assert_allclose(rows[0], theirs[name][-1].detach().numpy(), atol=1e-4, err_msg=name)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_fp_engine_pipeline_matches_diffusers(family, exported, tmp_path):
    folder, d, exp = exported[family]
    engines = {
        label: build(exp, tmp_path / label, BuildConfig(backend="onnxruntime", denoiser=label))
        for label in ("fp", "qdq")
    }
    meta = json.loads((engines["fp"] / "engine.json").read_text())
    assert {
        "vae_decoder",
        *(e["component"] for e in json.loads((exp / "runtime.json").read_text())["text"]["encoders"]),
    } == set(meta["parts"])
    assert all(k.startswith(("runtime", "conditioning", "tokenizers/")) for k in meta["files_sha256"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = compare_pipeline(
            load_pipeline(folder), d.family, engines, PipelineCheckConfig(prompts=["a red cat"], seeds=[0, 3], steps=4)
        )
    fp = [r for r in rows if r.engine == "fp"]
    assert len(fp) == 2 and all(r.passed and r.psnr_db >= 40 for r in fp), rows
    qdq = [r for r in rows if r.engine == "qdq"]
    assert len(qdq) == 2 and all(np.isfinite(r.psnr_db) and 0 < r.ssim <= 1 for r in qdq)
    # the quantized folder generates from text a user never exported, with torch blocked
    png = tmp_path / "dog.png"
    cmd = [
        sys.executable,
        "-c",
        BLOCK_TORCH,
        "generate",
        str(engines["qdq"]),
        "--prompt",
        "a dog on a bike",
        "-n",
        "2",
        "--steps",
        "2",
        "--out",
        str(png),
        "--quiet",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert p.returncode == 0 and png.exists(), p.stderr


def test_generate_from_text_without_torch(exported, tmp_path):
    _, _, exp = exported["sd"]
    assert main(["build", str(exp), "--backend", "onnxruntime", "--out", str(tmp_path / "eng")]) == 0
    png = tmp_path / "cats.png"
    cmd = [
        sys.executable,
        "-c",
        BLOCK_TORCH,
        "generate",
        str(tmp_path / "eng"),
        "--prompt",
        "a red cat",
        "--negative-prompt",
        "a blue dog",
        "-n",
        "2",
        "--steps",
        "3",
        "--guidance",
        "5",
        "--seed",
        "1",
        "--out",
        str(png),
        "--quiet",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert p.returncode == 0, p.stderr
    from PIL import Image

    img = Image.open(png)
    assert img.text["prompt"] == "a red cat" and img.text["negative_prompt"] == "a blue dog" and img.text["seed"] == "1"
    assert img.text["steps"] == "3" and img.text["plan_model_digest"]
    # the same seed gives the same bytes; a prompt the calibration never saw works (free text)
    again = tmp_path / "again.png"
    assert (
        subprocess.run(
            cmd[:-2] + [str(again), "--quiet"], capture_output=True, cwd=Path(__file__).parents[2]
        ).returncode
        == 0
    )
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))
    # the caption sits above the images: without it the grid is shorter by it, and equal below it
    bare = tmp_path / "bare.png"
    assert (
        subprocess.run(
            cmd[:-2] + [str(bare), "--quiet", "--no-caption"], capture_output=True, cwd=Path(__file__).parents[2]
        ).returncode
        == 0
    )
    full, plain = np.asarray(Image.open(png)), np.asarray(Image.open(bare))
    assert full.shape[0] > plain.shape[0] and np.array_equal(full[full.shape[0] - plain.shape[0] :], plain)
    # out-of-profile size and an overlong prompt: exit 2, one line, no traceback
    for extra, msg in (
        (["--height", "64"], "outside this engine's profile"),
        (["--prompt", "a" * 3000], "over the limit"),
    ):
        p = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=Path(__file__).parents[2])
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    # a tokenizer changed after the build is refused (every file of the folder is hashed)
    tok = tmp_path / "eng" / "tokenizers" / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"a</w>"', '"A</w>"'))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert p.returncode == 2 and "tokenizer.json changed since the folder was built" in p.stderr, p.stderr


def test_negative_prompt_and_seeds_change_images(exported):
    _, _, exp = exported["sd"]
    out = build(exp, exp.parent / "eng-neg", BuildConfig(backend="onnxruntime", denoiser="fp"))
    with PipelineFromFolder(out) as dp:
        cfg = GenerateConfig(steps=3, guidance=5.0, seed=0)
        base = dp(PipelineRequest(["a red cat"], 2, None, cfg))
        assert not np.array_equal(base[0], base[1])  # each image has its own noise stream
        neg = dp(PipelineRequest(["a red cat"], 2, ["a blue dog"], cfg))
        assert np.abs(neg - base).max() > 1e-3
        one = dp(PipelineRequest(["a red cat"], 1, None, cfg))
        np.testing.assert_allclose(one[0], base[0], atol=1e-5)  # image 0 does not depend on n
        with pytest.raises(DiffquantError, match="outside this engine's profile"):
            dp.latents(PipelineRequest(["a red cat"], 1, None, cfg, height=64, width=64))


def test_tensorrt_target_parts_fp16_unless_they_overflow(exported, tmp_path):
    folder, d, _ = exported["sd"]
    _, _, reports = export_parts(d, tmp_path, "tensorrt")
    assert {r.name: r.dtype for r in reports} == {"text_encoder": "float16", "vae_decoder": "float16"}
    assert all(r.ok and min(r.snr_db.values()) > 30 for r in reports), reports
    # an encoder whose activations leave FP16's range stays FP32, and says why
    enc = d.text_parts["text_encoder"]
    saved = enc.final_layer_norm.weight.detach().clone()
    with torch.no_grad():
        enc.final_layer_norm.weight.mul_(1e5)
    try:
        _, _, reports = export_parts(d, tmp_path / "hot", "tensorrt", PartsConfig())
    finally:
        with torch.no_grad():
            enc.final_layer_norm.weight.copy_(saved)
    te = next(r for r in reports if r.name == "text_encoder")
    assert te.dtype == "float32" and "over half of FP16" in te.why and te.max_abs_activation > 65504 / 2
