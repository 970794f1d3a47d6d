"""Quantizer sites: where in the model a quantizer sits, and what it holds.

A site is keyed by the module it belongs to and its role: a layer's ``input`` (``input#1`` for
the second half of a shortcut-split input), its ``weight``, its ``output`` (requantized on the
onnxruntime target), or an ``operand`` of an op that is not a conv/linear input (a matmul
operand such as attention probabilities). Each site holds a typed format and its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.errors import DiffquantError
from diffquant.quant.format import QuantFormat

__all__ = ["ROLES", "Site", "SiteKey", "input_multiplier", "pts_at", "step_at"]

ROLES = ("input", "weight", "output", "operand")


@dataclass(frozen=True)
class SiteKey:
    """``module`` (a dotted module name of the denoiser), ``role`` and, for inputs and operands,
    which one (0: a whole input or the first half of a split one). Written ``module:role[#i]``."""

    module: str
    role: str
    index: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DiffquantError(f"site role must be one of {ROLES}, got {self.role!r}")

    def __str__(self) -> str:
        return f"{self.module}:{self.role}" + (f"#{self.index}" if self.index else "")

    @property
    def local(self) -> str:
        """The key within its module: ``input``, ``input#1``, ``weight``, ``output``."""
        return str(self).rpartition(":")[2]

    @classmethod
    def parse(cls, text: str) -> SiteKey:
        module, sep, rest = text.rpartition(":")
        role, _, idx = rest.partition("#")
        if not sep or not module:
            raise DiffquantError(f"bad site key {text!r}: expected module:role or module:role#i")
        return cls(module, role, int(idx or 0))


def step_at(scale: torch.Tensor, role: str, group: int) -> torch.Tensor:
    """The step a quantizer uses: a weight site's whole scale, an activation site's entry for
    timestep ``group`` (its only entry without groups)."""
    if role == "weight":
        return scale
    s = scale.reshape(-1)
    return s[group if len(s) > 1 else 0]


def pts_at(k: torch.Tensor | None, group: int) -> torch.Tensor | None:
    """One timestep group's power-of-two exponents from a site's ``pts`` ([G, C] or [C])."""
    if k is None:
        return None
    return k.float() if k.dim() == 1 else k[group if len(k) > 1 else 0].float()


def input_multiplier(smooth: torch.Tensor | None, k: torch.Tensor | None) -> torch.Tensor | None:
    """The one per-input-channel factor before an activation quantizer: the smoothing vector
    times 2^k of power-of-two scaling (None: neither). Fake-quant and the graph both use it."""
    if k is None:
        return None if smooth is None else smooth.float()
    return torch.exp2(k) if smooth is None else torch.exp2(k) * smooth.float()


@dataclass
class Site:
    """One quantizer: its format and tensors, all rounded to the export dtype.

    ``scale``: weights [C] per output channel or [C, blocks]; activations [G], one step per
    timestep group (G = 1 without groups). Input sites may carry ``multiplier`` (per input
    channel, applied before the quantizer: equivalent scaling, its inverse folded into the
    weight) and ``pts`` (DMQ's power-of-two exponents, [G, C]: the input is multiplied by 2^k
    and the quantized weight by 2^-k). ``group`` is the key of the first site reading the same
    tensor (one Q/DQ per tensor in the graph); empty when the site leads its own."""

    key: SiteKey
    format: QuantFormat
    scale: torch.Tensor | None = None
    multiplier: torch.Tensor | None = None
    pts: torch.Tensor | None = None
    group: str = ""

    TENSORS = ("scale", "multiplier", "pts")

    def step(self, group: int = 0) -> torch.Tensor:
        """An activation site's step in timestep ``group`` (a weight site's whole scale)."""
        return step_at(self.scale, self.key.role, group)

    def input_multiplier(self, group: int = 0) -> torch.Tensor | None:
        """Smoothing x 2^k before this input's quantizer in ``group`` (None: neither)."""
        return input_multiplier(self.multiplier, pts_at(self.pts, group))

    @property
    def lead_layer(self) -> str:
        """The module whose site leads this site's input group (names the shared Q/DQ)."""
        return SiteKey.parse(self.group).module if self.group else self.key.module

    def tensors(self) -> dict[str, torch.Tensor]:
        """``<key>.<tensor>`` -> tensor, for the plan's safetensors file."""
        return {f"{self.key}.{n}": getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None}

    def to_dict(self) -> dict:
        return {"key": str(self.key), "format": self.format.to_dict(), "group": self.group}

    @classmethod
    def from_dict(cls, d: dict, tensors: dict[str, torch.Tensor]) -> Site:
        key = SiteKey.parse(d["key"])
        site = cls(key=key, format=QuantFormat.from_dict(d["format"]), group=str(d.get("group", "")))
        for n in cls.TENSORS:
            setattr(site, n, tensors.get(f"{key}.{n}"))
        return site
