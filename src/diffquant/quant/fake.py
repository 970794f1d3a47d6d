"""Fake quantization with ONNX QuantizeLinear/DequantizeLinear semantics.

q = saturate(round_half_to_even(x / scale)), x_hat = q * scale, with scales first rounded to the
dtype they are exported in (FP16 for TensorRT graphs) so that torch and the graph agree.
"""

from __future__ import annotations

import torch

from diffquant.quant.format import QuantFormat

__all__ = ["MIN_SCALE", "broadcast_scale", "fake_quant", "quantize_int", "round_scale", "scale_from_amax"]

# Smallest normal FP16 value: scales below it would be subnormal or round to 0 in an FP16 graph.
MIN_SCALE = 2.0**-14


def round_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Clamp tiny scales to MIN_SCALE and round them to ``dtype``; returned as float32."""
    s = scale.float().clamp(min=MIN_SCALE)
    return s.to(dtype).float()


def scale_from_amax(amax: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Scale that maps ``amax`` onto the grid's positive end, rounded to the export dtype."""
    return round_scale(amax.float() / fmt.qmax, dtype)


def broadcast_scale(scale: torch.Tensor, x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Reshape a scale so it broadcasts against ``x`` for the format's granularity."""
    if fmt.granularity == "tensor":
        return scale.reshape(())
    if fmt.granularity == "channel":
        shape = [1] * x.dim()
        shape[fmt.axis] = -1
        return scale.reshape(shape)
    # block: scale [C_out, K // block] over a weight [C_out, K, ...]; blocks along dim 1
    return scale.repeat_interleave(fmt.block_size, dim=1).reshape(
        scale.shape[0], -1, *([1] * (x.dim() - 2))
    )


def quantize_int(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Integer codes (as float) of ``x`` on the format's grid; no gradient."""
    s = broadcast_scale(scale, x, fmt)
    return torch.clamp(torch.round(x / s), fmt.qmin, fmt.qmax)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, ste: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x``. With ``ste`` the rounding passes gradients straight through
    (clipped elements get none), so the function can sit inside a training loop."""
    s = broadcast_scale(scale, x, fmt)
    if not ste:
        return torch.clamp(torch.round(x / s), fmt.qmin, fmt.qmax) * s
    v = x / s
    v = v + (torch.round(v) - v).detach()
    return torch.clamp(v, fmt.qmin, fmt.qmax) * s
