"""Range estimation: min-max, percentile, and MSE search (L_p error over shrinking ranges)."""

from __future__ import annotations

import torch

from diffquant.quant.fake import fake_quant, round_scale
from diffquant.quant.format import PerAxis, PerBlock, QuantFormat

__all__ = ["RANGE_METHODS", "mse_amax", "percentile_amax", "weight_amax"]

RANGE_METHODS = ("minmax", "percentile", "mse")


def percentile_amax(values: torch.Tensor, pct: float, dim: int | None = None) -> torch.Tensor:
    """The ``pct`` percentile of |values| (over everything, or along ``dim`` per row)."""
    a = values.abs().float()
    if dim is None:
        a = a.flatten()
        if a.numel() > 2**24:
            a = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[: 2**24]]
        return torch.quantile(a, pct / 100.0)
    return torch.quantile(a, pct / 100.0, dim=dim)


def mse_amax(
    values: torch.Tensor, amax: torch.Tensor, fmt: QuantFormat, candidates: int = 80, step: float = 0.01, p: float = 2.4
) -> torch.Tensor:
    """Shrink ``amax`` in ``step`` fractions over ``candidates`` tries and keep, per row (or for
    the whole tensor when ``amax`` is a scalar), the range with the lowest L_p error."""
    per_row = amax.dim() == 1
    v = values.float().reshape(len(amax), -1) if per_row else values.float().reshape(1, -1)
    base = amax.float().reshape(-1)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    flat_fmt = QuantFormat(bits=fmt.bits, granularity=PerAxis(0))
    for i in range(candidates):
        cand = base * (1 - step * i)
        scale = round_scale(cand / fmt.qmax)
        err = (fake_quant(v, scale, flat_fmt) - v).abs().pow(p).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    return best if per_row else best.reshape(())


def weight_amax(
    weight: torch.Tensor,
    fmt: QuantFormat,
    method: str = "minmax",
    pct: float = 99.99,
    candidates: int = 80,
    step: float = 0.01,
    p: float = 2.4,
) -> torch.Tensor:
    """Per-output-channel range of a Conv/Linear weight by ``method``; for a block format, one
    range per block of ``block_size`` input elements (shape [out, in // block])."""
    if isinstance(fmt.granularity, PerBlock):
        o, k, size = weight.shape[0], weight.shape[1], fmt.granularity.size
        rows = weight.detach().float().reshape(o * (k // size), size)
        return weight_amax(
            rows, QuantFormat(bits=fmt.bits, granularity=PerAxis(0)), method, pct, candidates, step, p
        ).reshape(o, -1)
    w = weight.detach().float().reshape(weight.shape[0], -1)
    amax = w.abs().amax(dim=1)
    if method == "percentile":
        amax = percentile_amax(w, pct, dim=1)
    elif method == "mse":
        amax = mse_amax(w, amax, fmt, candidates, step, p)
    return amax
