"""Per-sample loss weights by calibration timestep, pluggable into training passes.

A weighting is built once per training unit from the unit's calibration timesteps; each
iteration it gives one weight per sample of the batch (``weights``) and then sees the batch's
per-sample losses (``update``), so adaptive schemes (DMQ's) can keep per-timestep state.
Register a new one in one line: ``TIMESTEP_WEIGHTINGS["name"] = MyWeighting``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from diffquant.errors import DiffquantError

__all__ = ["TIMESTEP_WEIGHTINGS", "TimestepWeighting", "UniformWeighting", "make_weighting"]


class TimestepWeighting(Protocol):
    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """One weight per sample of a batch whose timesteps are ``t``."""

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """See the batch's per-sample losses (detached)."""


class UniformWeighting:
    """Every timestep weighs the same (Q-Diffusion, BRECQ)."""

    def __init__(self, timesteps: list[float]) -> None:
        self.timesteps = list(timesteps)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(t))

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        return None


TIMESTEP_WEIGHTINGS: dict[str, type] = {"uniform": UniformWeighting}


def make_weighting(name: str, timesteps: list[float]) -> TimestepWeighting:
    """Build the registered weighting ``name`` for a unit calibrated on ``timesteps``."""
    if name not in TIMESTEP_WEIGHTINGS:
        raise DiffquantError(f"unknown timestep weighting {name!r}; available: {', '.join(sorted(TIMESTEP_WEIGHTINGS))}")
    return TIMESTEP_WEIGHTINGS[name](timesteps)
