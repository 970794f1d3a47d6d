"""The `minmax` pass: weight ranges per output channel and activation ranges per tensor from
calibration data, by min-max, percentile or MSE search."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.errors import DiffquantError
from diffquant.pipeline.activations import observe_activations
from diffquant.pipeline.context import PassContext
from diffquant.pipeline.observers import RANGE_METHODS, mse_amax, percentile_amax, weight_amax
from diffquant.pipeline.registry import register_pass
from diffquant.quant.fake import MIN_SCALE, scale_from_amax
from diffquant.quant.modules import OUT_FORMAT

__all__ = ["MinMaxConfig", "minmax_pass"]


@dataclass
class MinMaxConfig:
    """Range settings. ``act_reduce`` reduces per-timestep ranges (``max`` or ``mean``)."""

    version: int = 1
    weight_range: str = "minmax"
    act_range: str = "minmax"
    percentile: float = 99.99
    mse_candidates: int = 80
    mse_step: float = 0.01
    mse_p: float = 2.4
    act_reduce: str = "max"
    batch_size: int = 256

    def __post_init__(self) -> None:
        for f in ("weight_range", "act_range"):
            if getattr(self, f) not in RANGE_METHODS:
                raise ValueError(f"{f} must be one of {RANGE_METHODS}, got {getattr(self, f)!r}")
        if self.act_reduce not in ("max", "mean"):
            raise ValueError(f"act_reduce must be 'max' or 'mean', got {self.act_reduce!r}")


def calibrate_weights(ctx: PassContext, cfg: MinMaxConfig) -> None:
    modules = dict(ctx.denoiser.model.named_modules())
    for lp in ctx.plan.quantized_layers():
        if not lp.weight:
            continue
        w = modules[lp.name].weight
        amax = weight_amax(w, lp.weight, cfg.weight_range, cfg.percentile, cfg.mse_candidates, cfg.mse_step, cfg.mse_p)
        zero = int((amax <= 0).sum())
        if zero:
            lp.notes.append(f"{zero} all-zero output channel(s): scale clamped to {MIN_SCALE:g}")
        ctx.plan.tensors[f"{lp.name}.weight_scale"] = scale_from_amax(amax, lp.weight)


def calibrate_activations(ctx: PassContext, cfg: MinMaxConfig) -> None:
    layers = [lp.name for lp in ctx.plan.quantized_layers() if lp.act]
    if not layers:
        return
    stats = observe_activations(ctx.denoiser, layers, ctx.calib, keep_samples=cfg.act_range != "minmax", batch_size=cfg.batch_size, progress=ctx.progress)
    ctx.act_stats = stats
    members: dict[str, list[str]] = {}
    for name in layers:
        members.setdefault(stats.groups[name], []).append(name)
    ranges = ctx.plan.timestep_groups
    per_group = [[t for t in ctx.calib.timesteps if ctx.plan.group_of(t) == g] for g in range(ctx.plan.n_groups)]
    for g, ts in enumerate(per_group):
        if not ts:
            raise DiffquantError(f"timestep group {g} {ranges[g]} holds no calibration timestep; use fewer groups")
    for group, names in members.items():
        scales, out_scales = [], {n: [] for n in names}
        for ts in per_group:
            amax = torch.tensor(max(stats.reduced_amax(n, cfg.act_reduce, ts) for n in names))
            if cfg.act_range != "minmax":
                values = torch.cat([v for n in names for v in stats.values(n, ts)])
                if cfg.act_range == "percentile":
                    amax = percentile_amax(values, cfg.percentile)
                else:
                    amax = mse_amax(values, amax, ctx.plan.layers[group].act, cfg.mse_candidates, cfg.mse_step, cfg.mse_p)
            if not float(amax) > 0:
                raise DiffquantError(
                    f"layer {group}: its input is identically zero over the calibration data (zero range), so no "
                    f"activation scale exists. Keep it in high precision with a targeting rule "
                    f"`{{pattern: '{group}', activations: false}}`, or check the calibration data in {ctx.calib.folder}"
                )
            scales.append(float(amax))
            for n in names:
                out_scales[n].append(stats.reduced_out_amax(n, ts))
        for n in names:
            lp = ctx.plan.layers[n]
            lp.input_group = group
            shape = () if ctx.plan.n_groups == 1 else (-1,)
            ctx.plan.tensors[f"{n}.act_scale"] = scale_from_amax(torch.tensor(scales), lp.act).reshape(shape)
            ctx.plan.tensors[f"{n}.out_scale"] = scale_from_amax(torch.tensor(out_scales[n]), OUT_FORMAT).reshape(shape)


@register_pass("minmax", MinMaxConfig)
def minmax_pass(ctx: PassContext, cfg: MinMaxConfig) -> None:
    """Set every weight and activation scale of the plan from observed ranges."""
    calibrate_weights(ctx, cfg)
    calibrate_activations(ctx, cfg)
