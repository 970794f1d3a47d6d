"""Numerics: what grid a tensor is quantized to (bits, symmetry, granularity), and bit strings."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from diffquant.errors import DiffquantError

__all__ = ["BitSetting", "QuantFormat", "parse_bits", "pts_budget"]

GRANULARITIES = ("tensor", "channel", "block")


@dataclass(frozen=True)
class QuantFormat:
    """A symmetric integer grid of ``bits`` bits: q in [-2^(b-1), 2^(b-1) - 1], zero point 0.

    ``granularity`` is "tensor" (one scale), "channel" (one scale per index of ``axis``) or
    "block" (one scale per ``block_size`` consecutive elements along the input axis).
    Grids of fewer than 8 bits are carried inside an INT8 container on export.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    block_size: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise DiffquantError(f"quantization bits must be 2..8, got {self.bits}")
        if not self.symmetric:
            raise DiffquantError(
                "asymmetric grids are not supported: TensorRT needs zero points of 0; use symmetric: true"
            )
        if self.granularity not in GRANULARITIES:
            raise DiffquantError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "block" and self.block_size <= 0:
            raise DiffquantError("granularity 'block' needs block_size > 0 (64 or 128 for TensorRT INT4)")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantFormat:
        unknown = set(d) - {"bits", "symmetric", "granularity", "axis", "block_size"}
        if unknown:
            raise DiffquantError(f"unknown QuantFormat keys: {sorted(unknown)}")
        return cls(**d)


def pts_budget(weight: QuantFormat | None) -> int:
    """Largest power-of-two exponent k that power-of-two activation scaling may give a layer
    with this weight format: the weight codes are shifted left by (K - k) with scale s_w / 2^K
    and must stay inside INT8, so K = min(3, 8 - bits) (3 at W4/W5, 0 at W8: no PTS)."""
    if weight is None or weight.granularity != "channel":
        return 0
    return max(0, min(3, 8 - weight.bits))


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
        raise DiffquantError(f"bad bits string {text!r}: expected wNaK such as w8a8, w4a8, w4a6, w8a16, or w4g64a16 (blocks)")
    wb, block, ab = int(m.group(1)), int(m.group(2) or 0), int(m.group(3))
    if not 2 <= wb <= 8 or not (2 <= ab <= 8 or ab == 16):
        raise DiffquantError(f"bad bits string {text!r}: weight bits must be 2..8, activation bits 2..8 or 16")
    if m.group(2) is not None and block < 2:
        raise DiffquantError(f"bad bits string {text!r}: block size must be at least 2 (64 or 128 for TensorRT INT4)")
    weight = QuantFormat(bits=wb, granularity="block", axis=1, block_size=block) if block else QuantFormat(bits=wb, granularity="channel", axis=0)
    act = None if ab == 16 else QuantFormat(bits=ab, granularity="tensor")
    return BitSetting(text=text.strip().lower(), weight=weight, act=act)
