"""`export(plan, denoiser, out)`: FP graph for the ladder plus the Q/DQ graph for a target."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from diffquant._io import atomic_path, write_json
from diffquant.errors import DiffquantError
from diffquant.exporters.lint import LintReport, lint
from diffquant.exporters.onnx_fp import fp_onnx_proto
from diffquant.exporters.qdq import lower_plan
from diffquant.models.denoiser import Denoiser
from diffquant.quant.plan import QuantPlan, weights_digest

__all__ = ["ExportResult", "TARGET_FLOAT", "export"]

TARGET_FLOAT = {"tensorrt": "float16"}


@dataclass
class ExportResult:
    fp_onnx: Path
    qdq_onnx: Path
    realized: dict
    act_dq: dict
    lint: LintReport


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def export(plan: QuantPlan, denoiser: Denoiser, out_dir: str | Path, target: str = "tensorrt", float_dtype: str | None = None) -> ExportResult:
    """Write ``unet.fp32.onnx`` (ladder step 1) and ``unet.qdq.onnx`` (the deployable graph) into
    ``out_dir``; refuses an unfrozen plan or one made for other weights, and lints the result."""
    if plan.state not in ("frozen", "exported"):
        raise DiffquantError(f"plan for {plan.model} is {plan.state!r}: export needs a frozen plan")
    if plan.model_digest != weights_digest(denoiser.model):
        raise DiffquantError(f"plan was made for weights {plan.model_digest}, not {denoiser.name}'s; quantize again")
    if target not in TARGET_FLOAT:
        raise DiffquantError(f"unknown target {target!r}; available: {', '.join(TARGET_FLOAT)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = fp_onnx_proto(denoiser, "float32")
    _save(fp32, out / "unet.fp32.onnx")
    fdtype = float_dtype or TARGET_FLOAT[target]
    base = fp32 if fdtype == "float32" else fp_onnx_proto(denoiser, fdtype)
    low = lower_plan(base, plan, target, weights=denoiser.model.state_dict())
    report = lint(low.model, str(out / "unet.qdq.onnx"))
    if not report.ok:
        lines = "\n  ".join(str(v) for v in report.violations[:20])
        raise DiffquantError(f"the lowered graph breaks TensorRT rules (nothing written):\n  {lines}")
    _save(low.model, out / "unet.qdq.onnx")
    write_json(out / "realized.json", {"target": target, "float_dtype": fdtype, "layers": low.realized, "skipped": plan.skipped})
    plan.state = "exported"
    return ExportResult(out / "unet.fp32.onnx", out / "unet.qdq.onnx", low.realized, low.act_dq, report)
