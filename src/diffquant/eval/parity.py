"""Parity of the exported Q/DQ graph (ONNX Runtime, Q/DQ fusion off) against the torch
fake-quant model, on recorded calibration inputs at several timesteps.

Two kinds of figures:
- **local step error**: every activation quantizer of the graph is judged on its own input —
  its DequantizeLinear output against torch fake-quant (plan scale, same grid) of the tensor its
  QuantizeLinear read — and every quantized weight against the fake-quant weight, in units of
  that quantizer's step. This is the contract (<= 1: only rounding-boundary flips). Measured
  locally so that one upstream flip is not counted again by every layer after it.
- **end to end**: the noise prediction's max-abs error, cosine and SNR against the fake-quant
  model, plus the share of activation codes that differ between the two runs (flip rate),
  which includes propagated flips and FP16 arithmetic.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from diffquant.engines import OrtEngine, with_outputs
from diffquant.models.denoiser import Denoiser
from diffquant.models.inputs import NamedInputs
from diffquant.quant.fake import broadcast_scale, fake_quant
from diffquant.quant.format import QuantFormat
from diffquant.quant.modules import quant_modules

__all__ = ["ParityInputs", "ParityResult", "TimestepParity", "check_parity", "merge_parity"]

# (calibration timestep, the denoiser's named inputs): recorded real model inputs
ParityInputs = list[tuple[float, NamedInputs]]


@dataclass
class TimestepParity:
    """Per-timestep verdict for the noise-prediction output."""

    timestep: float
    max_abs: float
    cosine: float
    snr_db: float
    max_step_error: float
    flip_rate: float
    passed: bool


@dataclass
class ParityResult:
    max_abs: float
    max_step_error: float
    weight_max_step_error: float
    cosine_min: float
    flip_rate: float
    step_tolerance: float
    cosine_threshold: float
    passed: bool
    per_timestep: list[TimestepParity] = field(default_factory=list)
    worst_tensors: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _weight_step_error(model: onnx.ModelProto, fq_model: torch.nn.Module) -> float:
    """Largest difference, in weight steps, between the graph's dequantized weights and the
    fake-quant weights (layout from the DequantizeLinear: axis 1 means a transposed [K, N],
    a ``block_size`` means INT4 blocks along K of a [K, N] weight)."""
    inits = {i.name: i for i in model.graph.initializer}
    dqs = {n.input[0]: {a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "DequantizeLinear"}
    worst = 0.0
    for name, mod in quant_modules(fq_model).items():
        qn = f"{name}.weight_quantized"
        if mod.weight_format is None or qn not in inits:
            continue
        q = numpy_helper.to_array(inits[qn]).astype(np.float32)
        if f"{name}.half1.weight_quantized" in inits:  # shortcut split: two convs, halves of the input channels
            q = np.concatenate(
                [q, numpy_helper.to_array(inits[f"{name}.half1.weight_quantized"]).astype(np.float32)], axis=1
            )
        attrs = dqs.get(qn, {})
        zp = inits.get(f"{name}.weight_zero_point")
        if zp is not None and not attrs.get("block_size"):  # zero points encode the grid (0, or 128 for U8)
            shape = [1] * q.ndim
            shape[attrs.get("axis", 1) % q.ndim] = -1
            q = q - numpy_helper.to_array(zp).astype(np.float32).reshape(shape)
        s = numpy_helper.to_array(inits[f"{name}.weight_scale"]).astype(np.float32)
        ref = mod.quant_weight().detach().numpy()
        if attrs.get("block_size"):
            got = (q * np.repeat(s, attrs["block_size"], axis=0)[: q.shape[0]]).T
        elif attrs.get("axis", 1) == 1 and q.ndim == 2:
            got = (q * s[None, :]).T
        else:
            got = q * s.reshape(-1, *([1] * (q.ndim - 1)))
        step = broadcast_scale(mod.weight_scale, mod.weight, mod.weight_format).detach().numpy()
        worst = max(worst, float((np.abs(got - ref) / step).max()))
    return worst


@torch.no_grad()
def check_parity(
    fq_denoiser: Denoiser,
    onnx_model: onnx.ModelProto,
    inputs: ParityInputs,
    step_tolerance: float = 1.0,
    cosine_threshold: float = 0.99,
) -> ParityResult:
    """Compare ``onnx_model`` (run by ONNX Runtime, fusion off) with ``fq_denoiser`` on ``inputs``."""
    meta = {p.key: p.value for p in onnx_model.metadata_props}
    act_dq: dict[str, dict] = json.loads(meta.get("diffquant.act_dq", "{}"))
    float_type = onnx_model.graph.input[0].type.tensor_type.elem_type  # the latent comes first
    np_float = np.float16 if float_type == onnx.TensorProto.FLOAT16 else np.float32
    graph_inputs = {i.name for i in onnx_model.graph.input}
    extra = [n_ for n_ in act_dq] + [info["input"] for info in act_dq.values() if info["input"] not in graph_inputs]
    engine = OrtEngine(with_outputs(onnx_model, sorted(set(extra)), float_type))
    mods = quant_modules(fq_denoiser.model)
    for m in mods.values():
        m.capture = True
    per_ts: list[TimestepParity] = []
    worst: dict[str, float] = {}
    try:
        for ts, named in inputs:
            ref = fq_denoiser(**named).numpy()
            feeds = named.numpy()
            out = engine.run(feeds)
            got = out[fq_denoiser.output_names[0]].astype(np.float32)
            step_err, flips, total = 0.0, 0, 0
            for dq_name, info in act_dq.items():
                src = feeds[info["input"]] if info["input"] in graph_inputs else out[info["input"]]
                src = np.asarray(src).astype(np_float).astype(np.float32)  # what the graph's Q read
                fmt = QuantFormat(bits=int(info["bits"]))
                scale = torch.tensor(float(info["scale"]))
                # the graph's DQ output is q * scale rounded to its float dtype: round ours alike
                local = fake_quant(torch.from_numpy(src), scale, fmt).numpy().astype(np_float).astype(np.float32)
                dq = out[dq_name].astype(np.float32)
                e = float(np.abs(dq - local.reshape(dq.shape)).max() / float(scale))
                step_err = max(step_err, e)
                worst[dq_name] = max(worst.get(dq_name, 0.0), e)
                cap = mods[info["layers"][0]].captured
                if info.get("kind") != "output" and cap is not None and cap.numel() == dq.size:
                    flips += int((np.abs(cap.numpy().reshape(dq.shape) - dq) > 0.5 * float(scale)).sum())
                    total += dq.size
            err = got - ref
            snr = 10 * np.log10(float((ref**2).sum()) / max(float((err**2).sum()), 1e-30))
            cos = _cos(got, ref)
            per_ts.append(
                TimestepParity(
                    timestep=float(ts),
                    max_abs=float(np.abs(err).max()),
                    cosine=cos,
                    snr_db=float(snr),
                    max_step_error=step_err,
                    flip_rate=flips / max(total, 1),
                    passed=step_err <= step_tolerance and cos >= cosine_threshold,
                )
            )
    finally:
        for m in mods.values():
            m.capture = False
            m.captured = None
    wstep = _weight_step_error(onnx_model, fq_denoiser.model)
    max_step = max([p.max_step_error for p in per_ts] + [wstep])
    cos_min = min(p.cosine for p in per_ts)
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    return ParityResult(
        max_abs=max(p.max_abs for p in per_ts),
        max_step_error=max_step,
        weight_max_step_error=wstep,
        cosine_min=cos_min,
        flip_rate=float(np.mean([p.flip_rate for p in per_ts])),
        step_tolerance=step_tolerance,
        cosine_threshold=cosine_threshold,
        passed=max_step <= step_tolerance and cos_min >= cosine_threshold,
        per_timestep=per_ts,
        worst_tensors=[{"tensor": k, "max_step_error": v} for k, v in top],
    )


def merge_parity(results: list[ParityResult]) -> ParityResult:
    """One verdict over several graphs' results (one per timestep group)."""
    if len(results) == 1:
        return results[0]
    per_ts = sorted((p for r in results for p in r.per_timestep), key=lambda p: -p.timestep)
    worst = sorted((w for r in results for w in r.worst_tensors), key=lambda w: -w["max_step_error"])[:5]
    return ParityResult(
        max_abs=max(r.max_abs for r in results),
        max_step_error=max(r.max_step_error for r in results),
        weight_max_step_error=max(r.weight_max_step_error for r in results),
        cosine_min=min(r.cosine_min for r in results),
        flip_rate=float(np.mean([r.flip_rate for r in results])),
        step_tolerance=results[0].step_tolerance,
        cosine_threshold=results[0].cosine_threshold,
        passed=all(r.passed for r in results),
        per_timestep=per_ts,
        worst_tensors=worst,
    )
