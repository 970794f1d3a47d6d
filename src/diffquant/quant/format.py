"""Numerics: what grid a tensor is quantized to (bits, symmetry, granularity, kind), and bit strings.

Granularity is a type: `PerTensor` (one scale), `PerAxis` (one scale per index of an axis) or
`PerBlock` (one scale per ``size`` consecutive elements along an axis). Bits are one int, or
with `PerAxis` one int per channel (mixed precision inside a layer, MPQ-DM's OMQ).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from diffquant.errors import DiffquantError

__all__ = [
    "KINDS",
    "BitSetting",
    "Granularity",
    "PerAxis",
    "PerBlock",
    "PerTensor",
    "QuantFormat",
    "parse_bits",
    "pts_budget",
]

KINDS = ("uniform", "log2")  # log2: research only (no deployable lowering)


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def to_dict(self) -> dict:
        return {"type": "tensor"}


@dataclass(frozen=True)
class PerAxis:
    """One scale per index of ``axis`` (weights: the output channel, axis 0)."""

    axis: int = 0

    def to_dict(self) -> dict:
        return {"type": "axis", "axis": self.axis}


@dataclass(frozen=True)
class PerBlock:
    """One scale per ``size`` consecutive elements along ``axis`` (weights: the input axis, 1)."""

    size: int
    axis: int = 1

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise DiffquantError("a block granularity needs size > 0 (64 or 128 for TensorRT INT4)")

    def to_dict(self) -> dict:
        return {"type": "block", "size": self.size, "axis": self.axis}


Granularity = PerTensor | PerAxis | PerBlock


def _granularity_from_dict(d: dict) -> Granularity:
    kind = d.get("type")
    if kind == "tensor":
        return PerTensor()
    if kind == "axis":
        return PerAxis(int(d.get("axis", 0)))
    if kind == "block":
        return PerBlock(int(d["size"]), int(d.get("axis", 1)))
    raise DiffquantError(f"unknown granularity {d!r}: expected type tensor, axis or block")


@dataclass(frozen=True)
class QuantFormat:
    """A symmetric integer grid: b bits hold q in [-2^(b-1), 2^(b-1) - 1], zero point 0; one bit
    holds two levels, q in {-1, +1} (the sign). ``bits`` is an int, or a tuple with one width per
    index of a `PerAxis` axis. Grids narrower than 8 bits are carried inside an INT8 container on
    export. ``kind`` "log2" (x = s * 2^-q) is research only: the fake-quant model, not a graph."""

    bits: int | tuple[int, ...] = 8
    granularity: Granularity = PerTensor()
    symmetric: bool = True
    kind: str = "uniform"

    def __post_init__(self) -> None:
        widths = self.bits if isinstance(self.bits, tuple) else (self.bits,)
        if not widths or not all(isinstance(b, int) and 1 <= b <= 8 for b in widths):
            raise DiffquantError(f"quantization bits must be 1..8, got {self.bits}")
        if isinstance(self.bits, tuple) and not isinstance(self.granularity, PerAxis):
            raise DiffquantError("per-channel bit widths need a per-axis granularity")
        if not self.symmetric:
            raise DiffquantError(
                "asymmetric grids are not supported: TensorRT needs zero points of 0; use symmetric: true"
            )
        if not isinstance(self.granularity, PerTensor | PerAxis | PerBlock):
            raise DiffquantError(f"granularity must be PerTensor, PerAxis or PerBlock, got {self.granularity!r}")
        if self.kind not in KINDS:
            raise DiffquantError(f"format kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def mixed(self) -> bool:
        """Whether the bit width varies per channel."""
        return isinstance(self.bits, tuple)

    @property
    def max_bits(self) -> int:
        return max(self.bits) if self.mixed else self.bits

    @property
    def mean_bits(self) -> float:
        return sum(self.bits) / len(self.bits) if self.mixed else float(self.bits)

    @property
    def research_only(self) -> bool:
        """Non-uniform grids have no Q/DQ form: they run in the fake-quant model only."""
        return self.kind != "uniform"

    @property
    def qmin(self) -> int | torch.Tensor:
        """Lowest code: an int, or a float tensor per channel for mixed widths."""
        return _limit(self.bits, low=True)

    @property
    def qmax(self) -> int | torch.Tensor:
        """Highest code: an int, or a float tensor per channel for mixed widths."""
        return _limit(self.bits, low=False)

    def label(self) -> str:
        """Short text for tables: ``int4 per-channel``, ``int1..3 per-channel``, ``int4 blocks of 64``."""
        bits = f"{min(self.bits)}..{max(self.bits)}" if self.mixed else str(self.bits)
        g = self.granularity
        where = (
            "per-tensor"
            if isinstance(g, PerTensor)
            else f"blocks of {g.size}"
            if isinstance(g, PerBlock)
            else "per-channel"
            if g.axis == 0
            else f"per-axis {g.axis}"
        )
        return f"{self.kind + ' ' if self.research_only else ''}int{bits} {where}"

    def with_bits(self, bits: int | tuple[int, ...]) -> QuantFormat:
        return QuantFormat(bits=bits, granularity=self.granularity, symmetric=self.symmetric, kind=self.kind)

    def to_dict(self) -> dict:
        return {
            "bits": list(self.bits) if self.mixed else self.bits,
            "granularity": self.granularity.to_dict(),
            "symmetric": self.symmetric,
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, d: dict) -> QuantFormat:
        unknown = set(d) - {"bits", "symmetric", "granularity", "kind"}
        if unknown:
            raise DiffquantError(f"unknown QuantFormat keys: {sorted(unknown)}")
        bits = d.get("bits", 8)
        gran = d.get("granularity", {"type": "tensor"})
        return cls(
            bits=tuple(int(b) for b in bits) if isinstance(bits, list) else int(bits),
            granularity=_granularity_from_dict(gran) if isinstance(gran, dict) else gran,
            symmetric=bool(d.get("symmetric", True)),
            kind=str(d.get("kind", "uniform")),
        )


def _limit(bits: int | tuple[int, ...], *, low: bool) -> int | torch.Tensor:
    def one(b: int) -> int:
        if b == 1:
            return -1 if low else 1
        return -(2 ** (b - 1)) if low else 2 ** (b - 1) - 1

    if isinstance(bits, tuple):
        return torch.tensor([float(one(b)) for b in bits])
    return one(bits)


def pts_budget(weight: QuantFormat | None) -> int:
    """Largest power-of-two exponent k that power-of-two activation scaling may give a layer
    with this weight format: the weight codes are shifted left by (K - k) with scale s_w / 2^K
    and must stay inside INT8, so K = min(3, 8 - bits) (3 at W4/W5, 0 at W8: no PTS)."""
    if weight is None or not isinstance(weight.granularity, PerAxis):
        return 0
    return max(0, min(3, 8 - weight.max_bits))


@dataclass(frozen=True)
class BitSetting:
    """A parsed bit string such as ``w4a8``: weight format and activation format (None: FP)."""

    text: str
    weight: QuantFormat | None
    act: QuantFormat | None


_BITS_RE = re.compile(r"^w(\d+)(?:g(\d+))?a(\d+)$")


def parse_bits(text: str) -> BitSetting:
    """Parse ``wNaK`` or ``wNgBaK``: weights per output channel (or, with ``gB``, per block of B
    input elements) on an N-bit grid, activations per tensor on a K-bit grid. N, K in 2..8;
    K = 16 means activations stay in floating point."""
    m = _BITS_RE.match(text.strip().lower())
    if not m:
        raise DiffquantError(
            f"bad bits string {text!r}: expected wNaK such as w8a8, w4a8, w4a6, w8a16, or w4g64a16 (blocks)"
        )
    wb, block, ab = int(m.group(1)), int(m.group(2) or 0), int(m.group(3))
    if not 2 <= wb <= 8 or not (2 <= ab <= 8 or ab == 16):
        raise DiffquantError(f"bad bits string {text!r}: weight bits must be 2..8, activation bits 2..8 or 16")
    if m.group(2) is not None and block < 2:
        raise DiffquantError(f"bad bits string {text!r}: block size must be at least 2 (64 or 128 for TensorRT INT4)")
    weight = QuantFormat(bits=wb, granularity=PerBlock(block, axis=1) if block else PerAxis(0))
    act = None if ab == 16 else QuantFormat(bits=ab, granularity=PerTensor())
    return BitSetting(text=text.strip().lower(), weight=weight, act=act)
