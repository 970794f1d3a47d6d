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

from diffquant.passes.context import PassContext
from diffquant.passes.observe.activations import Watch, observe_activations
from diffquant.passes.observe.scaling import input_channel_amax, smoothing_factors, write_smoothing
from diffquant.passes.registry import register_pass

__all__ = ["SmoothQuantConfig", "smoothquant_pass"]


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


@register_pass("smoothquant", SmoothQuantConfig)
def smoothquant_pass(ctx: PassContext, cfg: SmoothQuantConfig) -> None:
    """Decide one smoothing vector per input tensor of the selected layers."""
    layers = [lp.name for lp in ctx.plan.quantized_layers() if lp.act and lp.op in cfg.ops and not lp.split]
    if not layers:
        return
    watch = Watch(channel_amax=set(layers))
    stats = observe_activations(
        ctx.denoiser, layers, ctx.calib, watch, batch_size=cfg.batch_size, progress=ctx.progress
    )
    members: dict[str, list[str]] = {}
    for name in layers:
        members.setdefault(stats.lead(name), []).append(name)
    for lead, names in members.items():
        x_amax = torch.stack([stats.channel_amax[n] for n in names]).amax(dim=0)
        w_amax = torch.stack([input_channel_amax(ctx.weight(n)) for n in names]).amax(dim=0)
        s = smoothing_factors(x_amax, w_amax, cfg.alpha)
        write_smoothing(ctx, names, s, f"SmoothQuant alpha {cfg.alpha:g}, vector shared with {lead}")
