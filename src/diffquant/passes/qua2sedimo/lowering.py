"""Lowering a Qua2SeDiMo assignment into the plan: each layer's chosen option as a deployable
per-channel grid.

UAQ codes c in [0, 2^b - 1] with an integer zero point z are written as symmetric codes
c - z with the same (FP16-rounded) scale: exact. The symmetric grid that holds them is b bits wide
only when z = 2^(b-1); otherwise b + 1 (``widened``; the INT8 container holds either). K-Means
codebooks have no Q/DQ form: ``kmeans_lowering: regrid`` re-quantizes such a layer with UAQ at the
same bits (the error change is reported), ``fp16`` keeps its weights in floating point, and
``codebook`` rounds the centroids onto an INT8 per-channel grid (each row still holds at most 2^b
values, within half an 8-bit step of the codebook: the research numerics on the deployed graph,
counted as b-bit indices plus 8-bit centroids and an FP16 scale per row).
"""

from __future__ import annotations

import torch

from diffquant.passes.context import PassContext
from diffquant.passes.qua2sedimo.options import OptionCache, WeightOption, uaq
from diffquant.passes.qua2sedimo.sensitivity import block_of, op_type
from diffquant.quant.fake import round_scale
from diffquant.quant.format import PerAxis, QuantFormat

__all__ = ["LOWERINGS", "lower_codebook", "lower_option", "lower_uaq"]

LOWERINGS = ("regrid", "fp16", "codebook")


def lower_uaq(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], float]:
    """UAQ at ``bits`` as a symmetric per-channel grid: (weight on the grid, FP16-rounded scale,
    symmetric width per row (bits, or bits + 1 where the zero point is not 2^(bits-1)), the
    paper's bits per weight with FP16 scale and zero point)."""
    qw = uaq(weight, bits)
    scale = round_scale(qw.scale)
    rows = qw.codes.reshape(len(scale), -1).float() - qw.zero[:, None]
    widths = tuple(
        bits if (r.min() >= -(2 ** (bits - 1)) and r.max() <= 2 ** (bits - 1) - 1) else bits + 1 for r in rows
    )
    assert all(r.abs().max() <= 2**bits for r in rows), (
        "UAQ zero points lie on the grid, so b + 1 bits hold every shifted row"
    )
    w = (rows * scale[:, None]).reshape(weight.shape).to(weight.dtype)
    return w, scale, widths, qw.avg_bits()


def lower_option(
    ctx: PassContext, name: str, w: torch.Tensor, opt: WeightOption, cache: OptionCache, kmeans_lowering: str
) -> list:
    """Write ``name``'s chosen option into the plan; the report row (research and deployed form)."""
    lp = ctx.plan.layers[name]
    research = cache.get(w, opt)
    r_err, r_bits = research.error(w), research.avg_bits()
    row = [name, op_type(name), block_of(name), w.numel(), opt.label, round(r_bits, 3), round(r_err, 4)]
    if opt.research_only and kmeans_lowering == "fp16":
        del lp.sites["weight"]
        lp.notes.append(f"Qua2SeDiMo: {opt.label} has no Q/DQ form: weights kept in floating point")
        return row + ["fp16", 16.0, 0.0, "-"]
    if opt.research_only and kmeans_lowering == "codebook":
        new, scale, d_bits = lower_codebook(research)
        lp.weight_site.format, lp.weight_site.scale = QuantFormat(bits=8, granularity=PerAxis(0)), scale
        ctx.plan.weights[name] = new.to(w.dtype)
        d_err = float((new.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        lp.notes.append(f"Qua2SeDiMo: {opt.label}, deployed as its codebook values on an INT8 per-channel grid")
        return row + ["codebook on int8 grid", round(d_bits, 3), round(d_err, 4), "-"]
    new, scale, widths, d_bits = lower_uaq(w, opt.bits)
    lp.weight_site.format = QuantFormat(bits=widths if len(set(widths)) > 1 else widths[0], granularity=PerAxis(0))
    lp.weight_site.scale = scale
    ctx.plan.weights[name] = new
    d_err = float((new.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
    widened = sum(1 for b in widths if b > opt.bits)
    how = f"uaq-w{opt.bits}" + (" (re-gridded)" if opt.research_only else "")
    lp.notes.append(
        f"Qua2SeDiMo: {opt.label}, deployed {how}: {len(widths) - widened} rows exact at {opt.bits} bits, {widened} "
        f"widened to {opt.bits + 1}"
    )
    return row + [how, round(d_bits, 3), round(d_err, 4), f"{len(widths) - widened} / {widened}"]


def lower_codebook(qw) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A K-Means option's values on a symmetric INT8 per-channel grid: (weight, FP16-rounded
    scale, bits per weight counting b-bit indices, 8-bit centroids and the FP16 scales)."""
    w = qw.dequantize().float()
    rows = w.reshape(w.shape[0], -1)
    scale = round_scale(rows.abs().amax(dim=1) / 127)
    new = (torch.clamp(torch.round(rows / scale[:, None]), -127, 127) * scale[:, None]).reshape(w.shape)
    n = w.numel()
    return new, scale, (qw.option.bits * n + 8 * qw.centroids.numel() + 16 * len(scale)) / n
