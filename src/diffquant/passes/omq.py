"""The `omq` pass: MPQ-DM's Outlier-driven Mixed Quantization, bit widths per output channel.

For each quantized conv / linear whose weights are per output channel on an N-bit grid:
1. SmoothQuant-style pre-scale s_j = sqrt(max|X_j| / max|W_:,j|) per input channel (X from the
   calibration data). It only ranks channels: the layer itself is not rescaled (MPQ-DM's base,
   EfficientDM, has no equivalent scaling, and the plan keeps the layer as it was);
2. Pearson kurtosis (fourth central moment over the Bessel-corrected variance squared, no -3)
   of every output channel of W diag(s); channels sorted by it (``select: random`` shuffles
   them instead: the ablation that asks whether kurtosis matters);
3. with k = c_out // 10, the top g*k channels get N+1 bits, the bottom g*k get N-1 bits and the
   rest N, so the average stays exactly N; g is searched over 0..``max_g`` (``search: full``)
   or {0, 1} (``search: official``, what the released code does) by the layer-output MSE on
   calibration inputs with FP activations (a weights-only search). Each channel's range is
   searched for its own grid (L2.4, shrinking 1 % steps: MPQ-DM's per-group MSE search).
N-1 = 1 bit holds two levels (the sign); N+1 stays within INT8, so 8-bit layers are left alone.
The result is the weight site's per-channel bit vector and scales; deployed as per-channel grids
inside INT8 containers with per-channel scales.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.passes.context import PassContext
from diffquant.passes.observe.activations import Watch, observe_activations
from diffquant.passes.observe.capture import capture_inputs, layer_output, pick_samples
from diffquant.passes.observe.observers import weight_amax
from diffquant.passes.observe.scaling import input_channel_amax
from diffquant.passes.registry import register_pass
from diffquant.quant.fake import fake_quant, scale_from_amax
from diffquant.quant.format import PerAxis, QuantFormat
from diffquant.quant.plan import PassReport

__all__ = ["OMQConfig", "channel_bits", "kurtosis", "omq_pass"]

SEARCHES = ("full", "official")
SELECTS = ("kurtosis", "random")


@dataclass
class OMQConfig:
    """OMQ settings (MPQ-DM: g in 0..5 by output MSE, kurtosis ranking, L2.4 range search)."""

    version: int = 1
    search: str = "full"
    max_g: int = 5
    select: str = "kurtosis"
    samples: int = 256
    mse_candidates: int = 80
    mse_step: float = 0.01
    mse_p: float = 2.4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {self.select!r}")
        if not 0 <= self.max_g <= 5 or self.samples < 1:
            raise ValueError("max_g must be in 0..5 and samples positive")


def kurtosis(w: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis of each row of ``w`` [rows, n]: E[(x - mu)^4] / sigma^4, sigma with
    Bessel's correction, no -3 (a Gaussian row scores about 3)."""
    x = w.float() - w.float().mean(dim=1, keepdim=True)
    var = x.pow(2).sum(dim=1) / max(1, w.shape[1] - 1)
    return x.pow(4).mean(dim=1) / var.pow(2).clamp(min=1e-30)


def channel_bits(order: torch.Tensor, n_bits: int, g: int, k: int) -> tuple[int, ...]:
    """Bits per output channel: the first g*k of ``order`` (most outlier-prone) get N+1, the
    last g*k get N-1, the rest N."""
    bits = torch.full((len(order),), n_bits, dtype=torch.int64)
    if g * k:
        bits[order[: g * k]] = n_bits + 1
        bits[order[len(order) - g * k :]] = n_bits - 1
    return tuple(int(b) for b in bits)


def _order(w: torch.Tensor, x_amax: torch.Tensor, cfg: OMQConfig, gen: torch.Generator) -> torch.Tensor:
    """Output channels, most outlier-prone first."""
    if cfg.select == "random":
        return torch.randperm(w.shape[0], generator=gen)
    w_amax = input_channel_amax(w)
    s = torch.sqrt(x_amax.float() / w_amax.float())
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    ws = w.float() * s.reshape([1, -1] + [1] * (w.dim() - 2))
    return torch.argsort(kurtosis(ws.reshape(len(ws), -1)), descending=True, stable=True)


def _search(
    mod: nn.Module, w: torch.Tensor, x: torch.Tensor, n_bits: int, order: torch.Tensor, cfg: OMQConfig
) -> list[tuple[int, QuantFormat, torch.Tensor, float]]:
    """(g, format, scale, output MSE) for every candidate g."""
    k = w.shape[0] // 10
    top = 1 if cfg.search == "official" else cfg.max_g
    top = min(top, w.shape[0] // (2 * k)) if k else 0
    with torch.no_grad():
        ref = torch.cat([layer_output(mod, x[i : i + 256], w) for i in range(0, len(x), 256)])
        out = []
        for g in range(top + 1):
            fmt = QuantFormat(bits=channel_bits(order, n_bits, g, k) if g else n_bits, granularity=PerAxis(0))
            scale = scale_from_amax(
                weight_amax(w, fmt, "mse", candidates=cfg.mse_candidates, step=cfg.mse_step, p=cfg.mse_p), fmt
            )
            wq = fake_quant(w, scale, fmt)
            got = torch.cat([layer_output(mod, x[i : i + 256], wq) for i in range(0, len(x), 256)])
            out.append((g, fmt, scale, float((got - ref).pow(2).mean())))
    return out


@register_pass("omq", OMQConfig)
def omq_pass(ctx: PassContext, cfg: OMQConfig) -> None:
    """Choose per-output-channel bit widths (N-1 / N / N+1) for every N-bit per-channel weight."""
    plan = ctx.plan
    names = [
        lp.name
        for lp in plan.quantized_layers()
        if lp.weight and isinstance(lp.weight.granularity, PerAxis) and not lp.weight.mixed and 2 <= lp.weight.bits <= 7
    ]
    if not names:
        return
    stats = observe_activations(ctx.denoiser, names, ctx.calib, Watch(channel_amax=set(names)), progress=ctx.progress)
    data = pick_samples(ctx, cfg.samples)
    modules = dict(ctx.denoiser.model.named_modules())
    gen = torch.Generator().manual_seed(cfg.seed)
    report = PassReport(
        "omq",
        "Outlier-driven mixed quantization (g searched over "
        f"{'{0, 1}' if cfg.search == 'official' else f'0..{cfg.max_g}'}, channels by {cfg.select})",
        ["layer", "c_out", "N", "g", "channels at N-1 / N / N+1", "output MSE at g = 0", "chosen", "s"],
    )
    plan.reports.append(report)
    for name in tqdm(names, desc="omq", disable=not ctx.progress):
        t0 = time.time()
        lp, mod = plan.layers[name], modules[name]
        w = ctx.weight(name).float()
        stored = capture_inputs(ctx.denoiser, mod, data)
        x = stored[0][0][1]
        order = _order(w, stats.channel_amax[name], cfg, gen)
        n_bits = lp.weight.bits
        cands = _search(mod, w, x, n_bits, order, cfg)
        g, fmt, scale, mse = min(cands, key=lambda c: c[3])
        lp.weight_site.format, lp.weight_site.scale = fmt, scale
        counts = [sum(1 for b in fmt.bits if b == n_bits + d) for d in (-1, 0, 1)] if fmt.mixed else [0, w.shape[0], 0]
        lp.notes.append(
            f"OMQ: g = {g} ({' / '.join(map(str, counts))} channels at {n_bits - 1} / {n_bits} / {n_bits + 1} bits), "
            f"output MSE {cands[0][3]:.4g} -> {mse:.4g}"
        )
        report.rows.append(
            [name, w.shape[0], n_bits, g, " / ".join(map(str, counts)), cands[0][3], mse, round(time.time() - t0, 1)]
        )
