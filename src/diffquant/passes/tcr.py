"""The `tcr` pass: TCAQ-DM's timestep-channel joint reparameterization (Huang et al., AAAI 2025).

Per input channel c of every selected conv / linear, from the calibration inputs at each
calibration timestep t (the paper has no public code; this is the reading of its equations that
METHODS.md gives, each choice below a config field or written here):

    m_{t,c} = max |X_{t,c}|,   s_t = min_c m_{t,c},   r_{t,c} = m_{t,c} / s_t,
    r_c = sum_t m_{t,c} r_{t,c} / sum_t m_{t,c}      (timesteps where the channel is large dominate),

then r_c is clamped to [1, ``r_max``]. The layer computes Q(X / r) . Q(r * W): the same
equivalent scaling as LES and SmoothQuant, deployed the same way (the multiplier 1/r on the input
site, one Mul before the Q/DQ, r folded into the weight). Layers that read one tensor (Q/K/V,
the cross-attention K/V reading the conditioning) share one r: their inputs are the same tensor,
so m is the same; a tensor also read by a quantized layer TCR does not scale stays unscaled.

Choices the paper leaves open: s_t is the minimum over channels that are not silent at t
(m_{t,c} > 0; a dead channel would make every ratio infinite); a channel silent at every
timestep gets r = 1. ``r_max`` defaults to 10 (a third-party reimplementation's cap; the
benchmark sweeps it): without a cap one near-silent channel's neighbours get ratios in the
thousands and the weight columns they multiply swamp the per-output-channel weight grid.
One joint r over all timesteps deploys as one graph; the paper's per-timestep-group reading
(r per group, so the group graphs differ in their weights too: G copies of every scaled weight)
is not built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffquant.passes.context import PassContext
from diffquant.passes.observe.activations import Watch, observe_activations
from diffquant.passes.observe.scaling import scalable_layers, scaling_groups, write_smoothing
from diffquant.passes.registry import register_pass
from diffquant.quant.plan import PassReport

__all__ = ["TCRConfig", "tcr_factors", "tcr_pass"]


@dataclass
class TCRConfig:
    """``r_max``: the cap R on the per-channel factor (>= 1; 1 turns TCR off); ``ops``: which layer kinds are scaled."""

    version: int = 1
    r_max: float = 10.0
    ops: list[str] = field(default_factory=lambda: ["conv", "linear"])
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not self.r_max >= 1.0:
            raise ValueError(f"r_max (the cap R on r_c) must be >= 1, got {self.r_max}")


def tcr_factors(m: torch.Tensor, r_max: float) -> torch.Tensor:
    """r_c from the per-timestep channel ranges ``m`` [T, C] (see the module docstring), clamped to [1, r_max]."""
    m = m.double()
    live = m > 0
    s_t = torch.where(live, m, torch.full_like(m, float("inf"))).amin(dim=1, keepdim=True)
    r_tc = torch.where(live, m / s_t, torch.zeros_like(m))
    total = m.sum(dim=0)
    r = torch.where(total > 0, (m * r_tc).sum(dim=0) / total.clamp_min(1e-300), torch.ones_like(total))
    return r.clamp(1.0, r_max).float()


@register_pass("tcr", TCRConfig)
def tcr_pass(ctx: PassContext, cfg: TCRConfig) -> None:
    """Decide one TCR vector per input tensor of the selected layers."""
    plan = ctx.plan
    layers = scalable_layers(ctx, cfg.ops, "tcr")
    if not layers:
        return
    readers = [lp.name for lp in plan.quantized_layers() if lp.act and not lp.split]
    watch = Watch(channel_amax=set(layers))
    stats = observe_activations(
        ctx.denoiser, readers, ctx.calib, watch, batch_size=cfg.batch_size, progress=ctx.progress
    )
    report = PassReport(
        "tcr",
        f"Timestep-channel joint reparameterization (r capped at {cfg.r_max:g})",
        ["input group", "layers", "channels", "r max", "r mean", "capped", "act range before", "after"],
    )
    plan.reports.append(report)
    for lead, names in scaling_groups(ctx, layers, readers, stats, "TCR").items():
        per_t = stats.channel_amax_t[lead]
        m = torch.stack([per_t[t] for t in sorted(per_t)])
        r = tcr_factors(m, cfg.r_max)
        capped = int((r >= cfg.r_max).sum())
        if bool((r == 1).all()):  # r_max 1 (TCR off), or channels already level: no Mul in the graph
            continue
        write_smoothing(
            ctx,
            names,
            r,
            f"TCR: r in [{float(r.min()):.3g}, {float(r.max()):.3g}] over {len(r)} channels ({capped} at the cap "
            f"{cfg.r_max:g}), "
            f"from {len(per_t)} calibration timesteps"
            + (f"; shared with {len(names) - 1} layers reading the same tensor" if len(names) > 1 else ""),
        )
        amax = stats.channel_amax[lead]
        report.rows.append(
            [
                lead,
                len(names),
                len(r),
                float(r.max()),
                float(r.mean()),
                capped,
                float(amax.max()),
                float((amax / r).max()),
            ]
        )
