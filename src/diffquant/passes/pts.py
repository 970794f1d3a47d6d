"""The `pts` pass: DMQ's Power-of-Two Scaling with voting.

For the selected layers' inputs, each channel c gets an exponent k_c in {0..max_k}: the channel
is quantized with step s * 2^-k_c (s the per-tensor step already calibrated), i.e. multiplied by
2^k_c before the per-tensor quantizer, and the quantized weight's input channel c by 2^-k_c.
Deployed exactly inside INT8: 2^k joins the per-channel Mul before Q, and the integer weights
are shifted left by (K - k_c) with weight scale s_w / 2^K (K = the layer's largest k, at most
3 at W4, 0 at W8: see `pts_budget`).

``select: vote``: every calibration sample votes, per channel, for the k with the lowest
quantization error on that sample; the most voted k is used only if at least ``agreement`` of
the samples agree, else 0. ``select: mse``: per channel the k with the lowest error summed over
all samples (the ablation alternative). With timestep groups each group selects on its own
samples. ``layers`` picks families: ``skip`` (inputs that are a two-piece channel concat: the
UNet decoder ResBlocks' skip convs, DMQ's choice), ``conv``, ``linear`` or ``all``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.passes.context import PassContext
from diffquant.passes.observe.activations import concat_inputs
from diffquant.passes.observe.capture import capture_inputs, pick_samples
from diffquant.passes.registry import register_pass
from diffquant.quant.fake import MIN_SCALE, fake_quant
from diffquant.quant.format import pts_budget
from diffquant.quant.modules import smooth_input
from diffquant.quant.plan import PassReport

__all__ = ["PTSConfig", "pts_pass", "select_exponents"]

FAMILIES = ("skip", "conv", "linear", "all")
SELECTIONS = ("vote", "mse")


@dataclass
class PTSConfig:
    """PTS settings (DMQ: skip convs only, k in 0..3, 85 % agreement)."""

    version: int = 1
    layers: list[str] = field(default_factory=lambda: ["skip"])
    select: str = "vote"
    agreement: float = 0.85
    max_k: int = 3
    samples: int = 512

    def __post_init__(self) -> None:
        bad = set(self.layers) - set(FAMILIES)
        if bad or not self.layers:
            raise ValueError(f"layers must name families from {FAMILIES}, got {self.layers}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if not 0.0 < self.agreement <= 1.0 or not 0 <= self.max_k <= 3:
            raise ValueError("agreement must be in (0, 1] and max_k in 0..3")


def _channel_errors(x: torch.Tensor, scale: torch.Tensor, fmt, max_k: int, *, conv: bool) -> torch.Tensor:
    """[max_k + 1, samples, channels]: each sample's squared quantization error per channel
    with step scale * 2^-k."""
    xc = x.float().movedim(1 if conv else -1, 1).reshape(len(x), x.shape[1 if conv else -1], -1)
    errs = []
    for k in range(max_k + 1):
        f = 2.0**k
        errs.append((fake_quant(xc * f, scale, fmt) / f - xc).pow(2).sum(dim=2))
    return torch.stack(errs)


def select_exponents(errors: torch.Tensor, select: str, agreement: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponent per channel from per-sample errors [K + 1, samples, channels], and per channel
    the share of samples voting for the winner (1 for ``mse``)."""
    if select == "mse":
        return errors.sum(dim=1).argmin(dim=0).float(), torch.ones(errors.shape[2])
    votes = errors.argmin(dim=0)  # [samples, channels]
    mode = votes.mode(dim=0).values
    share = (votes == mode).float().mean(dim=0)
    return torch.where(share >= agreement, mode, torch.zeros_like(mode)).float(), share


def _candidates(ctx: PassContext, cfg: PTSConfig) -> list[str]:
    plan = ctx.plan
    layers = [lp.name for lp in plan.quantized_layers() if lp.act and lp.weight and not lp.split]
    fams = set(cfg.layers)
    if "all" in fams:
        return layers
    picked = {n for n in layers if plan.layers[n].op in fams}
    if "skip" in fams:
        picked |= set(concat_inputs(ctx.denoiser, layers, ctx.calib.at(ctx.calib.timesteps[0], 2)))
    return [n for n in layers if n in picked]


@register_pass("pts", PTSConfig)
def pts_pass(ctx: PassContext, cfg: PTSConfig) -> None:
    """Choose power-of-two exponents for the selected layers' input channels."""
    plan = ctx.plan
    names = _candidates(ctx, cfg)
    for n in names:
        if plan.layers[n].sites["input"].scale is None or plan.layers[n].weight_site.scale is None:
            raise DiffquantError(
                f"pts: layer {n} has no scales yet; run a range pass (minmax) before pts in the recipe"
            )
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(plan.layers[n].input_group or n, []).append(n)
    # layers outside the selection that read a selected tensor must get the same factors
    for n in (
        lp.name for lp in plan.quantized_layers() if lp.act and lp.input_group in groups and lp.name not in names
    ):
        if plan.layers[n].split or not plan.layers[n].weight:
            raise DiffquantError(
                f"pts: layer {n} shares its input with {plan.layers[n].input_group} but cannot take power-of-two "
                "factors"
            )
        groups[plan.layers[n].input_group].append(n)
    if not groups:
        return
    data = pick_samples(ctx, cfg.samples)
    modules = dict(ctx.denoiser.model.named_modules())
    ranges = [[i for i, t in enumerate(data[1]) if plan.group_of(t) == g] for g in range(plan.n_groups)]
    report = PassReport(
        "pts",
        f"Power-of-two scaling ({cfg.select}, agreement {cfg.agreement:g})",
        ["input group", "layers", "timestep group", "k budget", "channels per k (0, 1, ...)", "median agreement"],
    )
    plan.reports.append(report)
    for lead, members in groups.items():
        budget = min([cfg.max_k] + [pts_budget(plan.layers[n].weight) for n in members])
        why = (
            "max_k is 0"
            if cfg.max_k == 0
            else "its weight codes leave no room to shift inside INT8"
            if budget == 0
            else ""
        )
        # the weight scale s_w / 2^K must stay a normal FP16 number
        while budget > 0 and min(float(plan.weight_scale(n).min()) for n in members) / 2.0**budget < MIN_SCALE:
            budget -= 1
            why = why or "a weight scale / 2 would underflow FP16"
        if budget == 0:
            for n in members:
                plan.layers[n].notes.append(f"PTS skipped: {why}")
            continue
        stored = capture_inputs(ctx.denoiser, modules[lead], data)
        x = stored[0][0][1]
        conv = isinstance(modules[lead], nn.Conv2d)
        smooth = plan.layers[lead].sites["input"].multiplier
        if smooth is not None:
            x = smooth_input(x, smooth.float(), conv=conv)
        fmt = plan.layers[lead].act
        ks, notes = [], []
        for g, idx in enumerate(ranges):
            scale = plan.act_scale(lead, g).float()
            errors = torch.cat(
                [_channel_errors(x[idx[i : i + 256]], scale, fmt, budget, conv=conv) for i in range(0, len(idx), 256)],
                dim=1,
            )
            k, share = select_exponents(errors, cfg.select, cfg.agreement)
            ks.append(k)
            hist = {int(v): int((k == v).sum()) for v in range(budget + 1)}
            notes.append(
                f"group {g}: k histogram {hist}"
                + (f", median agreement {float(share.median()):.2f}" if cfg.select == "vote" else "")
            )
            report.rows.append(
                [lead, len(members), g, budget, " / ".join(str(c) for c in hist.values()), float(share.median())]
            )
        k = torch.stack(ks)
        for n in members:
            plan.layers[n].sites["input"].pts = k.clone()
            plan.layers[n].notes.append(f"PTS ({cfg.select}, k <= {budget}): " + "; ".join(notes))
