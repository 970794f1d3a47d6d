"""The `minmax` pass: weight ranges per output channel and activation ranges per tensor from
calibration data, by min-max, percentile or MSE search."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.errors import DiffquantError
from diffquant.passes.context import PassContext
from diffquant.passes.observe.activations import observe_plan_inputs
from diffquant.passes.observe.observers import RANGE_METHODS, mse_amax, percentile_amax, weight_amax
from diffquant.passes.registry import register_pass
from diffquant.quant.fake import MIN_SCALE, scale_from_amax
from diffquant.quant.plan import OUT_FORMAT

__all__ = ["MinMaxConfig", "minmax_pass"]


@dataclass
class MinMaxConfig:
    """Range settings. ``act_reduce`` reduces per-timestep ranges (``max``, ``mean``, or
    ``min-mean``: per timestep the mean over samples, then the minimum over timesteps);
    ``conv_act_reduce`` (if set) overrides it for conv inputs (NVIDIA's recipe uses
    ``min-mean`` on convs and ``max`` on linears)."""

    version: int = 1
    weight_range: str = "minmax"
    act_range: str = "minmax"
    percentile: float = 99.99
    mse_candidates: int = 80
    mse_step: float = 0.01
    mse_p: float = 2.4
    act_reduce: str = "max"
    conv_act_reduce: str = ""
    batch_size: int = 256

    def __post_init__(self) -> None:
        for f in ("weight_range", "act_range"):
            if getattr(self, f) not in RANGE_METHODS:
                raise ValueError(f"{f} must be one of {RANGE_METHODS}, got {getattr(self, f)!r}")
        for f in ("act_reduce", "conv_act_reduce"):
            if getattr(self, f) not in REDUCTIONS + (("",) if f == "conv_act_reduce" else ()):
                raise ValueError(f"{f} must be one of {REDUCTIONS}, got {getattr(self, f)!r}")
        if self.batch_size < 1 or self.mse_candidates < 1:
            raise ValueError(
                f"batch_size and mse_candidates must be >= 1, got {self.batch_size} and {self.mse_candidates}"
            )
        if not 0.0 < self.percentile <= 100.0 or not 0.0 < self.mse_step <= 1.0 or self.mse_p <= 0.0:
            raise ValueError(
                f"percentile must be in (0, 100], mse_step in (0, 1], mse_p > 0; got {self.percentile}, "
                f"{self.mse_step}, {self.mse_p}"
            )


REDUCTIONS = ("max", "mean", "min-mean")


def calibrate_weights(ctx: PassContext, cfg: MinMaxConfig) -> None:
    for lp in ctx.plan.quantized_layers():
        if not lp.weight:
            continue
        w = ctx.weight(lp.name)
        amax = weight_amax(w, lp.weight, cfg.weight_range, cfg.percentile, cfg.mse_candidates, cfg.mse_step, cfg.mse_p)
        zero = int((amax <= 0).sum())
        if zero:
            lp.notes.append(f"{zero} all-zero output channel(s): scale clamped to {MIN_SCALE:g}")
        lp.weight_site.scale = scale_from_amax(amax, lp.weight)


def calibrate_activations(ctx: PassContext, cfg: MinMaxConfig) -> None:
    qlayers = [lp for lp in ctx.plan.quantized_layers() if lp.act]
    if not qlayers:
        return
    stats = observe_plan_inputs(ctx, keep_samples=cfg.act_range != "minmax", batch_size=cfg.batch_size)
    sites = {str(s.key): (lp, s) for lp in qlayers for s in lp.input_sites}  # stats keys are site keys
    members: dict[str, list[str]] = {}
    for key in sites:
        members.setdefault(stats.groups[key], []).append(key)
    ranges = ctx.plan.timestep_groups
    per_group = [[t for t in ctx.calib.timesteps if ctx.plan.group_of(t) == g] for g in range(ctx.plan.n_groups)]
    for g, ts in enumerate(per_group):
        if not ts:
            raise DiffquantError(f"timestep group {g} {ranges[g]} holds no calibration timestep; use fewer groups")
    for group, keys in members.items():
        lead = sites[group][0]
        how = cfg.conv_act_reduce if cfg.conv_act_reduce and lead.op == "conv" else cfg.act_reduce
        scales = []
        for ts in per_group:
            amax = torch.tensor(max(stats.reduced_amax(k, how, ts) for k in keys))
            if cfg.act_range != "minmax":
                values = torch.cat([v for k in keys for v in stats.values(k, ts)])
                if cfg.act_range == "percentile":
                    amax = percentile_amax(values, cfg.percentile)
                else:
                    amax = mse_amax(values, amax, lead.act, cfg.mse_candidates, cfg.mse_step, cfg.mse_p)
            if not float(amax) > 0:
                raise DiffquantError(
                    f"layer {lead.name}: its input is identically zero over the calibration data (zero range), so no "
                    f"activation scale exists. Keep it in high precision with a targeting rule "
                    f"`{{pattern: '{lead.name}', activations: false}}`, or check the calibration data in "
                    f"{ctx.calib.folder}"
                )
            scales.append(float(amax))
        for k in keys:
            site = sites[k][1]
            site.group = group
            site.scale = scale_from_amax(torch.tensor(scales), site.format)
    for lp in qlayers:
        outs = [stats.reduced_out_amax(lp.name, ts) for ts in per_group]
        lp.output_site.scale = scale_from_amax(torch.tensor(outs), OUT_FORMAT)


@register_pass("minmax", MinMaxConfig)
def minmax_pass(ctx: PassContext, cfg: MinMaxConfig) -> None:
    """Set every weight and activation scale of the plan from observed ranges."""
    calibrate_weights(ctx, cfg)
    calibrate_activations(ctx, cfg)
