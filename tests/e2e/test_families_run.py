"""`diffquant run` on a tiny SD-1.x-layout pipeline folder (save_pretrained), from a prompts file,
then the user's path to a deployed pipeline: build the run folder, generate from a new prompt,
validate the engine folder's images against the diffusers pipeline."""

import json
import warnings

import pytest

from diffquant.cli import main
from tests.pipelines import make_pipeline


@pytest.mark.e2e
def test_run_sd_pipeline_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = make_pipeline("sd", tmp_path / "sd15")
    (tmp_path / "prompts.txt").write_text("a red cat\na lighthouse at dusk\n")
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            str(folder),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--bits",
            "w8a8",
            "--out",
            str(out),
            "--samples",
            "4",
            "--steps",
            "5",
            "--calib-samples",
            "4",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr()
    r = json.loads((out / "report.json").read_text())
    assert r["family"]["family"] == "sd" and r["parity"]["passed"] and r["parity"]["max_step_error"] <= 1.0
    assert r["quality"]["quant"]["psnr"] > 15 and "fd" not in r["quality"]["quant"]  # no feature model: fidelity only
    assert len(r["noise_fidelity"]) >= 1 and r["noise_fidelity"][0]["quant"]["cosine"] > 0.9
    runtime = json.loads((out / "runtime.json").read_text())
    assert [i["name"] for i in runtime["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert runtime["inputs"][2]["example"] == [1, 77, 32] and runtime["latent"]
    assert main(["lint", str(out / "unet.qdq.onnx")]) == 0
    # the run folder builds into the whole pipeline (FP16 parts for the tensorrt target, run up-cast on this CPU)
    parts = json.loads((out / "parts.json").read_text())["parts"]
    assert {p["name"]: p["dtype"] for p in parts} == {"text_encoder": "float16", "vae_decoder": "float16"} and all(
        p["ok"] for p in parts
    )
    assert main(["build", str(out), "--backend", "onnxruntime", "--out", str(tmp_path / "eng")]) == 0
    png = tmp_path / "dog.png"
    assert (
        main(
            [
                "generate",
                str(tmp_path / "eng"),
                "--prompt",
                "a dog on a bike",
                "--negative-prompt",
                "blurry",
                "-n",
                "2",
                "--steps",
                "3",
                "--out",
                str(png),
                "--quiet",
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(png).text["prompt"] == "a dog on a bike"
    # images of the engine folders against the diffusers pipeline: FP engines >= 40 dB
    capsys.readouterr()
    assert (
        main(["validate", str(out), "--against", "pipeline", "--pipeline-prompt", "a red cat", "--pipeline-steps", "4"])
        == 0
    ), capsys.readouterr().out
    v = json.loads((out / "validate.json").read_text())
    assert v["verdict"] == "PASS" and min(r["psnr_db"] for r in v["images"] if r["engine"] == "fp") >= 40
