"""The `smoothquant` pass: SmoothQuant equivalent scaling (Xiao et al.), as NVIDIA's diffusion
INT8 recipe applies it to linears (alpha 0.8).

Per input channel j of a linear: s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha); the layer
then computes Q(X / s) . Q(W * s). Layers that read one tensor (Q/K/V, all cross-attention
K/V readers of the conditioning) share one vector, taking the max of their weight ranges, so
the deployed graph keeps one Mul + Q/DQ per tensor. The plan stores the multiplier 1/s (rounded
to FP16, as the graph holds it) on the layer's input site and W * s as its replacement weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffquant.errors import DiffquantError
from diffquant.pipeline.activations import observe_activations
from diffquant.pipeline.context import PassContext
from diffquant.pipeline.minmax import plan_weight
from diffquant.pipeline.registry import register_pass
from diffquant.quant.fake import round_scale

__all__ = [
    "SmoothQuantConfig",
    "input_channel_amax",
    "scalable_layers",
    "scaling_groups",
    "smoothing_factors",
    "smoothquant_pass",
    "write_smoothing",
]


@dataclass
class SmoothQuantConfig:
    """``alpha``: migration strength; ``ops``: which layer kinds are smoothed."""

    version: int = 1
    alpha: float = 0.8
    ops: list[str] = field(default_factory=lambda: ["linear"])
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def input_channel_amax(w: torch.Tensor) -> torch.Tensor:
    """max |W| per input channel (dim 1) of a Linear [out, in] or Conv [out, in, kh, kw]."""
    return w.detach().abs().transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)


def smoothing_factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel s = max|X|^alpha / max|W|^(1 - alpha) (1 where undefined):
    the layer then computes Q(X / s) . Q(W * s)."""
    x_amax, w_amax = x_amax.float(), w_amax.float()
    s = x_amax.pow(alpha) / w_amax.pow(1 - alpha)
    return torch.where((x_amax > 0) & (w_amax > 0) & torch.isfinite(s), s, torch.ones_like(s))


@register_pass("smoothquant", SmoothQuantConfig)
def smoothquant_pass(ctx: PassContext, cfg: SmoothQuantConfig) -> None:
    """Decide one smoothing vector per input tensor of the selected layers."""
    layers = [lp.name for lp in ctx.plan.quantized_layers() if lp.act and lp.op in cfg.ops and not lp.split]
    if not layers:
        return
    stats = observe_activations(
        ctx.denoiser, layers, ctx.calib, batch_size=cfg.batch_size, progress=ctx.progress, channel_amax=set(layers)
    )
    members: dict[str, list[str]] = {}
    for name in layers:
        members.setdefault(stats.lead(name), []).append(name)
    for lead, names in members.items():
        x_amax = torch.stack([stats.channel_amax[n] for n in names]).amax(dim=0)
        w_amax = torch.stack([input_channel_amax(plan_weight(ctx, n)) for n in names]).amax(dim=0)
        s = smoothing_factors(x_amax, w_amax, cfg.alpha)
        write_smoothing(ctx, names, s, f"SmoothQuant alpha {cfg.alpha:g}, vector shared with {lead}")


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
        w = plan_weight(ctx, n).float()
        shape = [1, -1] + [1] * (w.dim() - 2)
        ctx.plan.weights[n] = (w / mult.reshape(shape)).contiguous()
        ctx.plan.layers[n].sites["input"].multiplier = mult.clone()
        ctx.plan.layers[n].notes.append(note)
