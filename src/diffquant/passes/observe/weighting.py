"""Per-sample loss weights by calibration timestep, pluggable into training passes.

A weighting is built once per training unit from the unit's calibration timesteps; each
iteration it gives one weight per sample of the batch (``weights``) and then sees the batch's
per-sample losses (``update``), so adaptive schemes (DMQ's) can keep per-timestep state.
Register a new one in one line: ``TIMESTEP_WEIGHTINGS["name"] = MyWeighting``.

The non-uniform weightings are normalized to mean 1 over the unit's calibration timesteps, so
that switching weighting changes the balance between timesteps, not the loss scale (which
would shift the balance against AdaRound's regularizer).
"""

from __future__ import annotations

from typing import Protocol

import torch

from diffquant.errors import DiffquantError

__all__ = [
    "TIMESTEP_WEIGHTINGS",
    "AdaptiveWeighting",
    "LinearWeighting",
    "TimestepWeighting",
    "UniformWeighting",
    "make_weighting",
]


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


class LinearWeighting(UniformWeighting):
    """Weight falling linearly with the timestep, 1 - t / (t_max + 1): the late, low-noise
    steps that shape the final image weigh most (an ablation alternative in DMQ)."""

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        top = max(self.timesteps) + 1.0
        norm = sum(1.0 - s / top for s in self.timesteps) / len(self.timesteps)
        return (1.0 - t.float() / top) / norm


class AdaptiveWeighting(UniformWeighting):
    """DMQ's adaptive timestep weighting: lambda_t = (1 - L_t / sum_t' L_t')^alpha, with L_t an
    EMA (``momentum``) of the loss seen at calibration timestep t. Timesteps whose loss
    dominates are down-weighted, so the small-loss steps near the end of sampling (where
    errors accumulate into the image) are not drowned out. One instance per training unit:
    the state is kept per layer (or block)."""

    def __init__(self, timesteps: list[float], alpha: float = 20.0, momentum: float = 0.95) -> None:
        super().__init__(timesteps)
        self.alpha, self.momentum = alpha, momentum
        self.ema: dict[float, float] = {}

    def lam(self) -> dict[float, float]:
        """Current lambda per calibration timestep, normalized to mean 1 (1 before any loss)."""
        total = sum(self.ema.values())
        if total <= 0:
            return {t: 1.0 for t in self.timesteps}
        raw = {t: (1.0 - self.ema[t] / total) ** self.alpha if t in self.ema else 1.0 for t in self.timesteps}
        mean = sum(raw.values()) / len(raw)
        return {t: v / mean if mean > 0 else 1.0 for t, v in raw.items()}

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        lam = self.lam()
        return torch.tensor([lam.get(float(v), 1.0) for v in t.tolist()])

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for v in torch.unique(t).tolist():
            mean = float(losses[t == v].mean())
            prev = self.ema.get(float(v))
            self.ema[float(v)] = mean if prev is None else self.momentum * prev + (1 - self.momentum) * mean


TIMESTEP_WEIGHTINGS: dict[str, type] = {
    "uniform": UniformWeighting,
    "linear": LinearWeighting,
    "adaptive": AdaptiveWeighting,
}


def make_weighting(name: str, timesteps: list[float]) -> TimestepWeighting:
    """Build the registered weighting ``name`` for a unit calibrated on ``timesteps``."""
    if name not in TIMESTEP_WEIGHTINGS:
        raise DiffquantError(
            f"unknown timestep weighting {name!r}; available: {', '.join(sorted(TIMESTEP_WEIGHTINGS))}"
        )
    return TIMESTEP_WEIGHTINGS[name](timesteps)
