"""Fake quantization with ONNX QuantizeLinear/DequantizeLinear semantics.

q = saturate(round_half_to_even(x / scale)), x_hat = q * scale, with scales first rounded to the
dtype they are exported in (FP16 for TensorRT graphs) so that torch and the graph agree.
"""

from __future__ import annotations

import torch

from diffquant.errors import DiffquantError
from diffquant.quant.format import PerAxis, PerTensor, QuantFormat

__all__ = [
    "MIN_SCALE",
    "broadcast_scale",
    "code_limits",
    "fake_quant",
    "log2_fake_quant",
    "quantize_int",
    "round_scale",
    "scale_from_amax",
]

# Smallest normal FP16 value: scales below it would be subnormal or round to 0 in an FP16 graph.
MIN_SCALE = 2.0**-14


def round_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Clamp tiny scales to MIN_SCALE and round them to ``dtype``; returned as float32."""
    s = scale.float().clamp(min=MIN_SCALE)
    return s.to(dtype).float()


def scale_from_amax(amax: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Scale that maps ``amax`` onto the grid's positive end, rounded to the export dtype."""
    return round_scale(amax.float() / fmt.qmax, dtype)


def _along(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def broadcast_scale(scale: torch.Tensor, x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Reshape a scale so it broadcasts against ``x`` for the format's granularity."""
    g = fmt.granularity
    if isinstance(g, PerTensor):
        return scale.reshape(())
    if isinstance(g, PerAxis):
        return _along(scale, x, g.axis)
    # block: scale [C_out, K // size] over a weight [C_out, K, ...]; blocks along dim 1
    return scale.repeat_interleave(g.size, dim=1).reshape(scale.shape[0], -1, *([1] * (x.dim() - 2)))


def code_limits(fmt: QuantFormat, x: torch.Tensor) -> tuple:
    """(lowest, highest) code of the grid, broadcastable against ``x`` (per channel for mixed widths)."""
    if not fmt.mixed:
        return fmt.qmin, fmt.qmax
    axis = fmt.granularity.axis
    return _along(fmt.qmin.to(x.device), x, axis), _along(fmt.qmax.to(x.device), x, axis)


def _binary(fmt: QuantFormat, x: torch.Tensor) -> torch.Tensor | None:
    """Where the grid has one bit (two levels, the sign): a mask broadcastable against ``x``."""
    if not fmt.mixed:
        return torch.ones((), dtype=torch.bool) if fmt.bits == 1 else None
    mask = torch.tensor([b == 1 for b in fmt.bits])
    return _along(mask.to(x.device), x, fmt.granularity.axis) if bool(mask.any()) else None


def _round(v: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round half to even (the sign on one-bit channels), not yet clamped."""
    one = _binary(fmt, v)
    q = torch.round(v)
    return q if one is None else torch.where(one, torch.where(v >= 0, 1.0, -1.0), q)


def _codes(v: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    lo, hi = code_limits(fmt, v)
    return torch.clamp(_round(v, fmt), lo, hi)


def quantize_int(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Integer codes (as float) of ``x`` on the format's grid; no gradient."""
    if fmt.research_only:
        raise DiffquantError(f"a {fmt.kind} grid has no integer codes in a Q/DQ graph (research only)")
    return _codes(x / broadcast_scale(scale, x, fmt), fmt)


def log2_fake_quant(x: torch.Tensor, s: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Research-only log2 grid: |x| -> s * 2^-q, q = round(-log2(|x| / s)) in 0 .. 2^b - 2, the
    last code meaning 0; the sign is kept. No Q/DQ form exists (the exporter refuses it)."""
    top = 2**fmt.max_bits - 1
    q = torch.clamp(torch.round(-torch.log2((x.abs() / s).clamp(min=1e-30))), 0, top)
    return torch.sign(x) * torch.where(q >= top, torch.zeros_like(x), s * torch.exp2(-q))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, *, ste: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x``. With ``ste`` the rounding passes gradients straight through
    (clipped elements get none), so the function can sit inside a training loop; the step
    sizes get LSQ's gradient either way."""
    s = broadcast_scale(scale, x, fmt)
    if fmt.research_only:
        y = log2_fake_quant(x, s, fmt)
        return x + (y - x).detach() if ste else y
    if not ste:
        return _codes(x / s, fmt) * s
    v = x / s
    lo, hi = code_limits(fmt, v)
    q = v + (_round(v, fmt) - v).detach()
    return torch.clamp(q, lo, hi) * s
