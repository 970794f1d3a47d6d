"""The builtin latent text-to-image model end to end: quantize digits-ldm, build the run folder
into a pipeline, `generate "a handwritten seven"` with torch blocked, and check that the deployed
pipeline draws sevens (the builtin digits classifier reads them)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffquant.cli import main
from diffquant.engines import GenerateConfig
from diffquant.engines.deployed import PipelineFromFolder, PipelineRequest
from diffquant.models.loading import load_classifier
from tests.pipelines import BLOCK_TORCH


@pytest.mark.e2e
def test_digits_ldm_builds_and_draws_the_digit_asked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            "builtin:digits-ldm",
            "--recipe",
            "minmax",
            "--bits",
            "w8a8",
            "--target",
            "onnxruntime",
            "--out",
            str(run),
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
    r = json.loads((run / "report.json").read_text())
    assert (
        r["parity"]["max_step_error"] <= 1.0
        and r["quality"]["quant"]["psnr"] > 15
        and 0 <= r["quality"]["quant"]["accuracy"] <= 1
    )
    parts = {p["name"]: p for p in json.loads((run / "parts.json").read_text())["parts"]}
    assert set(parts) == {"text_encoder", "vae_decoder"} and all(
        p["ok"] and p["dtype"] == "float32" for p in parts.values()
    )
    eng = tmp_path / "eng"
    assert main(["build", str(run), "--backend", "onnxruntime", "--out", str(eng)]) == 0
    # torch-free, as a user without torch runs it
    png = tmp_path / "sevens.png"
    cmd = [
        sys.executable,
        "-c",
        BLOCK_TORCH,
        "generate",
        str(eng),
        "--prompt",
        "a handwritten seven",
        "-n",
        "4",
        "--steps",
        "20",
        "--seed",
        "3",
        "--out",
        str(png),
        "--quiet",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert p.returncode == 0, p.stderr
    from PIL import Image

    assert Image.open(png).text["prompt"] == "a handwritten seven"
    # the deployed pipeline's images are sevens, and a three is not
    clf = load_classifier()
    with PipelineFromFolder(eng) as pipe:
        for word, digit in (("seven", 7), ("three", 3)):
            imgs = pipe(PipelineRequest([f"a handwritten {word}"], n=8, settings=GenerateConfig(steps=20, seed=5)))
            assert imgs.shape == (8, 1, 32, 32)
            with torch.no_grad():
                pred = clf(F.interpolate(torch.from_numpy(imgs).float(), size=(16, 16), mode="area")).argmax(1)
            assert int((pred == digit).sum()) >= 6, (word, pred.tolist())
