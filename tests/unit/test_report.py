"""What a person reads: the collapse note, the small-N warning, labelled grids."""

import numpy as np
from PIL import Image

from diffquant._png import save_grid_array
from diffquant.artifacts import RunReport
from diffquant.cli.quantize import print_summary as _print_summary
from diffquant.eval.report import collapse_note


def _report(fq: dict, *, passed: bool = False) -> RunReport:
    t = {
        "timestep": 1.0,
        "passed": passed,
        "max_step_error": 0.0,
        "cosine": 0.9 if not passed else 1.0,
        "flip_rate": 0.01,
    }
    return RunReport.from_json(
        {
            "model": "builtin:digits-sd",
            "family": {"family": "digits"},
            "recipe": "minmax",
            "bits": "w3a3",
            "target": "tensorrt",
            "onnx": "runs/x/unet.qdq.onnx",
            "graphs": ["runs/x/unet.qdq.onnx"],
            "quality": {"fp": {"fd": 208.8, "accuracy": 1.0}, "fake_quant": fq, "quant": fq},
            "parity": {
                "passed": passed,
                "max_step_error": 0.0,
                "cosine_min": t["cosine"],
                "max_abs": 1.0,
                "flip_rate": 0.01,
                "step_tolerance": 1.0,
                "cosine_threshold": 0.99,
                "per_timestep": [t],
            },
        },
        "report.json",
    )


def test_a_collapsed_fake_quant_model_is_named_not_fp16_rounding(capsys):
    assert collapse_note({"fake_quant": {"accuracy": 1.0, "psnr": 30.0}}) == ""
    note = collapse_note({"fake_quant": {"accuracy": 0.2, "psnr": 4.9}})
    assert "collapsed" in note and "accuracy 0.2" in note and "PSNR vs FP dB 4.9" in note
    _print_summary(_report({"accuracy": 0.2, "psnr": 4.9}), "runs/x")
    out = capsys.readouterr().out
    assert "collapsed" in out and "FP16 rounding" not in out and "next: read runs/x/report.md" in out
    _print_summary(_report({"accuracy": 1.0, "psnr": 30.0}), "runs/x")
    out = capsys.readouterr().out
    assert "FP16 rounding" in out and "collapsed" not in out


def test_a_passing_run_prints_what_it_wrote_and_the_next_command(capsys):
    _print_summary(_report({"accuracy": 1.0, "psnr": 40.0}, passed=True), "runs/x")
    out = capsys.readouterr().out
    assert "wrote runs/x/" in out and "next: diffquant build runs/x --out runs/x/engine --backend tensorrt" in out


def test_grids_carry_a_title_and_row_labels(tmp_path):
    x = np.zeros((6, 1, 8, 8), np.float32)
    plain = Image.open(save_grid_array(x, tmp_path / "a.png", ncol=3))
    labelled = Image.open(
        save_grid_array(
            x,
            tmp_path / "b.png",
            ncol=3,
            title="FP | fake-quant | deployed\nfirst 6 of 60",
            row_labels=["zero", "seven"],
        )
    )
    assert labelled.height > plain.height and labelled.width > plain.width
    ink = np.asarray(labelled)[: labelled.height - plain.height] < 128  # dark pixels of the title band
    assert ink.any()
