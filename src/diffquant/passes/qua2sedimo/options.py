"""Qua2SeDiMo's per-layer weight quantizer options, data-free and computed once per layer:
UAQ (per-output-channel asymmetric uniform grid, clip ratio chosen among ten by L2.4 error),
K-Means-C (a 2^b codebook per output channel) and K-Means-A (one 2^b codebook per layer), each
at 3 or 4 bits. Every option keeps its codes and parameters, so it can be dequantized, costed in
bits with its FP16 overhead, and later lowered; K-Means codebooks are research-only (no Q/DQ form).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffquant._io import atomic_path

__all__ = ["METHODS", "OptionCache", "QuantizedWeight", "WeightOption", "kmeans_codebook", "quantize_option", "uaq"]

METHODS = ("uaq", "kmeans-c", "kmeans-a")
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))  # 1.00, 0.95, ..., 0.55
OVERHEAD_BITS = 16  # scales, zero points and centroids are stored in FP16


@dataclass(frozen=True)
class WeightOption:
    """One choice for a layer's weights: a method of ``METHODS`` at ``bits`` bits."""

    method: str
    bits: int

    def __post_init__(self) -> None:
        if self.method not in METHODS or not 1 <= self.bits <= 8:
            raise ValueError(
                f"weight option {self.method!r} at {self.bits} bits: method must be one of {METHODS}, bits 1..8"
            )

    @property
    def label(self) -> str:
        return f"{self.method}-w{self.bits}"

    @property
    def research_only(self) -> bool:
        """K-Means codebooks have no Q/DQ form: deployed, they are re-gridded or kept in FP16."""
        return self.method != "uaq"


@dataclass
class QuantizedWeight:
    """A weight quantized by one option: integer ``codes`` shaped like the weight, and either a
    per-row ``scale`` / ``zero`` (UAQ) or ``centroids`` [rows, 2^b] (rows = 1 for K-Means-A)."""

    option: WeightOption
    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    centroids: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        codes = self.codes.long()
        rows = codes.reshape(codes.shape[0], -1) if self.option.method != "kmeans-a" else codes.reshape(1, -1)
        if self.option.method == "uaq":
            w = (rows.float() - self.zero[:, None]) * self.scale[:, None]
        else:
            w = torch.gather(self.centroids, 1, rows)
        return w.reshape(codes.shape)

    def overhead_bits(self) -> int:
        """Bits of the FP16 parameters: scale + zero per row (UAQ), the codebooks (K-Means)."""
        if self.option.method == "uaq":
            return OVERHEAD_BITS * 2 * self.scale.numel()
        return OVERHEAD_BITS * self.centroids.numel()

    def avg_bits(self) -> float:
        """Bits per weight with the overhead counted (Qua2SeDiMo's accounting)."""
        n = self.codes.numel()
        return (self.option.bits * n + self.overhead_bits()) / n

    def error(self, weight: torch.Tensor) -> float:
        """Relative L2 error ||W - Q(W)|| / ||W||."""
        w = weight.detach().float()
        return float((w - self.dequantize()).norm() / w.norm().clamp_min(1e-12))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes}
        out.update(
            {
                k: v
                for k, v in (("scale", self.scale), ("zero", self.zero), ("centroids", self.centroids))
                if v is not None
            }
        )
        return out


def uaq(weight: torch.Tensor, bits: int, p: float = 2.4) -> QuantizedWeight:
    """Per-output-channel asymmetric uniform quantization; each row's range [min, max] (widened to
    hold 0, so the integer zero point lies on the grid) is shrunk by the clip ratio (of
    ``CLIP_RATIOS``) with the lowest L``p`` error of that row."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    levels = 2**bits - 1
    lo0, hi0 = (
        w.min(dim=1).values.clamp(max=0.0),
        w.max(dim=1).values.clamp(min=0.0),
    )  # the grid holds 0: zero points in [0, 2^b - 1]
    best_err = torch.full((w.shape[0],), float("inf"))
    best = (torch.ones_like(lo0), torch.zeros_like(lo0))
    for r in CLIP_RATIOS:
        scale = ((hi0 - lo0) * r / levels).clamp_min(1e-12)
        zero = torch.round(-lo0 * r / scale)
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, levels)
        err = ((q - zero[:, None]) * scale[:, None] - w).abs().pow(p).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
    scale, zero = best
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, levels).to(torch.uint8)
    return QuantizedWeight(WeightOption("uaq", bits), codes.reshape(weight.shape), scale=scale, zero=zero)


def kmeans_codebook(rows: torch.Tensor, k: int, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of every row of ``rows`` [R, N]: Lloyd's algorithm seeded with the uniform
    min-max grid (so the error never exceeds that grid's; quantile seeds crowd the centre and stall
    on heavy tails), an empty cluster keeping its centroid: (centroids [R, k], codes [R, N])."""
    x = rows.float()
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    c = lo + (hi - lo) * torch.linspace(0, 1, k)[None, :]
    for _ in range(iters):
        codes = _assign(x, c)
        sums = torch.zeros_like(c).scatter_add_(1, codes, x)
        counts = torch.zeros_like(c).scatter_add_(1, codes, torch.ones_like(x))
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c, _assign(x, c)


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Nearest centroid of every value, in column chunks (the [R, N, k] distances stay small)."""
    return torch.cat(
        [(x[:, i : i + chunk, None] - c[:, None, :]).abs().argmin(dim=2) for i in range(0, x.shape[1], chunk)], dim=1
    )


def quantize_option(weight: torch.Tensor, option: WeightOption) -> QuantizedWeight:
    """``weight`` quantized by ``option`` (data-free)."""
    if option.method == "uaq":
        return uaq(weight, option.bits)
    w = weight.detach().float()
    rows = w.reshape(w.shape[0], -1) if option.method == "kmeans-c" else w.reshape(1, -1)
    centroids, codes = kmeans_codebook(rows, 2**option.bits)
    return QuantizedWeight(option, codes.to(torch.uint8).reshape(weight.shape), centroids=centroids)


class OptionCache:
    """Options computed once per (weight, option): in memory, and in ``folder`` if given (keyed
    by a hash of the weight's bytes, so a changed weight is never served a stale option)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self.memory: dict[tuple[str, WeightOption], QuantizedWeight] = {}

    @staticmethod
    def digest(weight: torch.Tensor) -> str:
        w = weight.detach().float().contiguous()
        return hashlib.sha256(str(tuple(w.shape)).encode() + w.numpy().tobytes()).hexdigest()[:24]

    def get(self, weight: torch.Tensor, option: WeightOption) -> QuantizedWeight:
        key = (self.digest(weight), option)
        if key in self.memory:
            return self.memory[key]
        path = self.folder / f"{key[0]}-{option.label}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            qw = QuantizedWeight(option, **load_file(str(path)))
        else:
            qw = quantize_option(weight, option)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    save_file({k: v.contiguous() for k, v in qw.tensors().items()}, str(tmp))
        self.memory[key] = qw
        return qw
