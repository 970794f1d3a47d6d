"""Equivalent scaling, shared by the passes that decide it (SmoothQuant, LES, TCR): which layers
may be scaled, how they group by the tensor they read (one vector per tensor, so the deployed
graph keeps one Mul + Q/DQ per tensor), SmoothQuant's heuristic factors, and how a decided
vector is written into the plan (the input site's multiplier 1/s and the replacement weight W * s).
"""

from __future__ import annotations

import torch

from diffquant.errors import DiffquantError
from diffquant.passes.context import PassContext
from diffquant.quant.fake import round_scale

__all__ = ["input_channel_amax", "scalable_layers", "scaling_groups", "smoothing_factors", "write_smoothing"]


def input_channel_amax(w: torch.Tensor) -> torch.Tensor:
    """max |W| per input channel (dim 1) of a Linear [out, in] or Conv [out, in, kh, kw]."""
    return w.detach().abs().transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)


def smoothing_factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel s = max|X|^alpha / max|W|^(1 - alpha) (1 where undefined):
    the layer then computes Q(X / s) . Q(W * s)."""
    x_amax, w_amax = x_amax.float(), w_amax.float()
    s = x_amax.pow(alpha) / w_amax.pow(1 - alpha)
    return torch.where((x_amax > 0) & (w_amax > 0) & torch.isfinite(s), s, torch.ones_like(s))


def scalable_layers(ctx: PassContext, ops: list[str], what: str) -> list[str]:
    """The quantized conv / linear layers of kinds ``ops`` that a per-input-channel scaling pass
    (LES, TCR) may scale: activations and weights quantized, input not split; refused when an
    earlier pass already scaled one (one equivalent-scaling pass per recipe)."""
    plan = ctx.plan
    layers = [lp.name for lp in plan.quantized_layers() if lp.act and lp.weight and lp.op in ops and not lp.split]
    for n in layers:
        if plan.layers[n].sites["input"].multiplier is not None:
            raise DiffquantError(
                f"{what}: layer {n} is already scaled by an earlier pass; use one equivalent-scaling pass per recipe"
            )
    return layers


def scaling_groups(ctx: PassContext, layers: list[str], readers: list[str], stats, what: str) -> dict[str, list[str]]:
    """``layers`` grouped by the tensor they read (lead layer -> members: one vector per tensor).
    A tensor also read by a quantized layer outside ``layers`` (among ``readers``, observed in
    ``stats``) stays unscaled, as its one Q/DQ serves both; its layers say so in their notes."""
    members: dict[str, list[str]] = {}
    for n in readers:
        members.setdefault(stats.lead(n), []).append(n)
    for lead in [g for g, names in members.items() if not set(names) <= set(layers)]:
        for n in set(members.pop(lead)) & set(layers):
            ctx.plan.layers[n].notes.append(
                f"{what} skipped: its input is also read by a quantized layer that {what} does not scale"
            )
    return members


def write_smoothing(ctx: PassContext, names: list[str], s: torch.Tensor, note: str) -> None:
    """Record equivalent scaling by ``s`` (the input is divided by it, the weight multiplied)
    for layers ``names`` reading one tensor: the multiplier 1/s rounded to FP16 (what
    the graph holds; kept within [2^-10, 2^12] so that 2^k of power-of-two scaling still fits
    FP16) as the input site's multiplier, and the replacement weight W / (1/s)."""
    mult = round_scale((1.0 / s.float()).clamp(min=2.0**-10, max=2.0**12))
    for n in names:
        w = ctx.weight(n).float()
        shape = [1, -1] + [1] * (w.dim() - 2)
        ctx.plan.weights[n] = (w / mult.reshape(shape)).contiguous()
        ctx.plan.layers[n].sites["input"].multiplier = mult.clone()
        ctx.plan.layers[n].notes.append(note)
