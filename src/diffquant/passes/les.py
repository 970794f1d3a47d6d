"""The `les` pass: DMQ's Learned Equivalent Scaling (Lee et al., ICCV 2025).

One positive scale tau per input channel of every selected conv / linear; the layer computes
Q(X / tau) . Q(tau * W). Layers that read one tensor (Q/K/V, every cross-attention K/V reading
the conditioning) share one tau, so the deployed graph keeps one Mul + Q/DQ per tensor. tau =
exp(theta) stays positive; theta is trained against the FP layer outputs on FP inputs, with
dynamic min/max quantizers (the activation step from the batch's range, the weight steps from
each output channel's range) and straight-through rounding, by Adam with cosine decay to 0.
The per-sample loss is weighted by calibration timestep (DMQ's ``adaptive`` weighting, kept per
input group; ``uniform`` / ``linear`` for the ablation). ``init: smoothquant`` starts from
SmoothQuant's heuristic (alpha ``alpha``); with ``iters: 0`` that heuristic is used as is.

The result is written like SmoothQuant's: the input site's multiplier 1/tau (FP16) and the
replacement weight tau * W, which later passes (weight ranges, AdaRound) quantize.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.errors import DiffquantError
from diffquant.passes.context import PassContext
from diffquant.passes.observe.activations import Watch, observe_activations
from diffquant.passes.observe.capture import capture_inputs, layer_output, per_sample_loss, pick_samples
from diffquant.passes.observe.scaling import (
    input_channel_amax,
    scalable_layers,
    scaling_groups,
    smoothing_factors,
    write_smoothing,
)
from diffquant.passes.observe.weighting import make_weighting
from diffquant.passes.registry import register_pass
from diffquant.quant.fake import MIN_SCALE, fake_quant
from diffquant.quant.format import PerAxis
from diffquant.quant.modules import smooth_input
from diffquant.quant.plan import PassReport

__all__ = ["LESConfig", "les_pass"]

INITS = ("one", "smoothquant")


@dataclass
class LESConfig:
    """LES settings. ``iters`` per input group (DMQ: 6000 at batch 32 on LDM-4; the digits
    models need far fewer); ``samples`` calibration inputs recorded per group."""

    version: int = 1
    init: str = "one"
    alpha: float = 0.5
    iters: int = 100
    batch_size: int = 32
    samples: int = 512
    lr: float = 1e-3
    timestep_weighting: str = "adaptive"
    ops: list[str] = field(default_factory=lambda: ["conv", "linear"])
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.iters < 0 or self.batch_size < 1 or self.samples < 1:
            raise ValueError("iters must be >= 0, batch_size and samples positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def _quant_out(mod: nn.Module, lp, x: torch.Tensor, w: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The layer on Q(X / tau) and Q(tau * W), with dynamic ranges and straight-through rounding."""
    conv = isinstance(mod, nn.Conv2d)
    xs = smooth_input(x, 1.0 / tau, conv=conv)
    xq = fake_quant(xs, (xs.abs().amax() / lp.act.qmax).clamp(min=MIN_SCALE), lp.act, ste=True)
    ws = w * tau.reshape([1, -1] + [1] * (w.dim() - 2))
    wscale = (ws.abs().reshape(len(ws), -1).amax(dim=1) / lp.weight.qmax).clamp(min=MIN_SCALE)
    return layer_output(mod, xq, fake_quant(ws, wscale, lp.weight, ste=True))


@register_pass("les", LESConfig)
def les_pass(ctx: PassContext, cfg: LESConfig) -> None:
    """Learn one equivalent-scaling vector per input tensor of the selected layers."""
    plan = ctx.plan
    layers = scalable_layers(ctx, cfg.ops, "les")
    for n in layers:
        if not isinstance(plan.layers[n].weight.granularity, PerAxis):
            raise DiffquantError(
                f"les: layer {n} has {type(plan.layers[n].weight.granularity).__name__} weight scales; LES needs "
                "per-channel weights"
            )
    if not layers:
        return
    readers = [lp.name for lp in plan.quantized_layers() if lp.act and not lp.split]
    watch = Watch(channel_amax=set(layers) if cfg.init == "smoothquant" else set())
    stats = observe_activations(ctx.denoiser, readers, ctx.calib, watch, progress=ctx.progress)
    members = scaling_groups(ctx, layers, readers, stats, "LES")
    data = pick_samples(ctx, cfg.samples)
    modules = dict(ctx.denoiser.model.named_modules())
    gen = torch.Generator().manual_seed(cfg.seed)
    report = PassReport(
        "les",
        f"Learned equivalent scaling ({cfg.iters} iterations, init {cfg.init}, {cfg.timestep_weighting} weighting)",
        ["input group", "layers", "loss before", "after", "tau min", "tau max", "s"],
    )
    plan.reports.append(report)
    bar = tqdm(members.items(), desc="les", disable=not ctx.progress)
    for lead, names in bar:
        t0 = time.time()
        weights = {n: ctx.weight(n).float() for n in names}
        if cfg.init == "smoothquant":
            x_amax = torch.stack([stats.channel_amax[n] for n in names]).amax(dim=0)
            w_amax = torch.stack([input_channel_amax(weights[n]) for n in names]).amax(dim=0)
            tau0 = smoothing_factors(x_amax, w_amax, cfg.alpha)
        else:
            tau0 = torch.ones(weights[names[0]].shape[1])
        tau, before, after = tau0, None, None
        if cfg.iters:
            tau, before, after = _train(ctx, cfg, modules, names, weights, tau0, data, gen)
            how = (
                f"LES ({cfg.iters} iters, init {cfg.init}, {cfg.timestep_weighting} weighting): dynamic-quant "
                f"output loss {before:.4g} -> {after:.4g} ({time.time() - t0:.0f} s)"
            )
        else:
            how = (
                f"equivalent scaling by the SmoothQuant heuristic (alpha {cfg.alpha:g}), untrained"
                if cfg.init == "smoothquant"
                else "LES with 0 iterations and init 1: no scaling"
            )
        if len(names) > 1:
            others = [n for n in names if n != lead]
            shared = ", ".join(others) if len(names) < 4 else f"{len(names) - 1} layers reading the same tensor"
            how += f"; vector shared with {shared}"
        write_smoothing(ctx, names, tau, how)
        report.rows.append(
            [lead, len(names), before, after, float(tau.min()), float(tau.max()), round(time.time() - t0, 1)]
        )


def _train(
    ctx: PassContext, cfg: LESConfig, modules: dict, names: list[str], weights: dict, tau0: torch.Tensor, data, gen
) -> tuple[torch.Tensor, float, float]:
    """Train one input group's tau = exp(theta) from ``tau0``; returns (tau, loss before, after)."""
    plan = ctx.plan
    theta = nn.Parameter(torch.log(tau0.clamp(min=2.0**-12, max=2.0**10)))
    stored = capture_inputs(ctx.denoiser, modules[names[0]], data)
    x = stored[0][0][1]
    tl = torch.tensor(data[1])
    chunks = [torch.arange(i, min(i + 256, len(x))) for i in range(0, len(x), 256)]
    with torch.no_grad():
        targets = {n: torch.cat([layer_output(modules[n], x[i], weights[n]) for i in chunks]) for n in names}

    def loss_at(idx: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return sum(
            per_sample_loss(_quant_out(modules[n], plan.layers[n], x[idx], weights[n], tau), targets[n][idx])
            for n in names
        )

    def mean_loss(tau: torch.Tensor) -> float:
        with torch.no_grad():
            return float(sum(loss_at(i, tau).sum() for i in chunks) / len(x))

    before = mean_loss(torch.exp(theta.detach()))
    weighting = make_weighting(cfg.timestep_weighting, sorted(set(data[1])))
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
    for _ in range(cfg.iters):
        idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=gen)
        losses = loss_at(idx, torch.exp(theta))
        loss = (weighting.weights(tl[idx]) * losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        weighting.update(tl[idx], losses.detach())
    if not torch.isfinite(theta).all():
        raise DiffquantError(f"les: the scales of {names[0]} diverged; lower lr")
    tau = torch.exp(theta.detach())
    return tau, before, mean_loss(tau)
