"""A numpy DDIM scheduler (eta = 0) that reads diffusers scheduler configs, so the runtime
sampler needs no torch. Tested against diffusers' DDIMScheduler step for step."""

from __future__ import annotations

import math

import numpy as np

from diffquant.errors import DiffquantError

__all__ = ["NumpyDDIM"]


def _betas(cfg: dict) -> np.ndarray:
    n = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        ab = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - ab((i + 1) / n) / ab(i / n), 0.999) for i in range(n)], dtype=np.float64)
    raise DiffquantError(f"beta_schedule {kind!r} is not supported by the runtime sampler (linear, scaled_linear, squaredcos_cap_v2)")


class NumpyDDIM:
    """Deterministic DDIM over a diffusers-style config: ``timesteps(steps)`` and ``step``."""

    def __init__(self, config: dict) -> None:
        self.config = dict(config)
        self.num_train = int(self.config.get("num_train_timesteps", 1000))
        betas = _betas(self.config).astype(np.float32)  # diffusers keeps the schedule in float32
        self.alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32).astype(np.float64)
        self.final_alpha = 1.0 if self.config.get("set_alpha_to_one", True) else float(self.alphas_cumprod[0])
        self.prediction = self.config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise DiffquantError(f"prediction_type {self.prediction!r} is not supported by the runtime sampler")
        self.clip = bool(self.config.get("clip_sample", True))  # diffusers DDIM default
        self.clip_range = float(self.config.get("clip_sample_range", 1.0))

    def timesteps(self, steps: int) -> np.ndarray:
        """The model timesteps of a ``steps``-step run, in sampling order (diffusers' spacing)."""
        if not 1 <= steps <= self.num_train:
            raise DiffquantError(f"steps must be 1..{self.num_train}, got {steps}")
        spacing = self.config.get("timestep_spacing", "leading")
        if spacing == "leading":
            ts = (np.arange(steps) * (self.num_train // steps)).round()[::-1] + int(self.config.get("steps_offset", 0))
        elif spacing == "trailing":
            ts = np.round(np.arange(self.num_train, 0, -self.num_train / steps)) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, self.num_train - 1, steps).round()[::-1]
        else:
            raise DiffquantError(f"timestep_spacing {spacing!r} is not supported by the runtime sampler")
        return ts.astype(np.int64)

    def step(self, model_out: np.ndarray, t: int, x: np.ndarray, steps: int) -> np.ndarray:
        """x_{t-1} from x_t and the (guided) model output, as diffusers' DDIM with eta = 0."""
        prev = t - self.num_train // steps
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        x64, m = x.astype(np.float64), model_out.astype(np.float64)
        if self.prediction == "epsilon":
            x0, eps = (x64 - math.sqrt(1 - a) * m) / math.sqrt(a), m
        elif self.prediction == "v_prediction":
            x0 = math.sqrt(a) * x64 - math.sqrt(1 - a) * m
            eps = math.sqrt(a) * m + math.sqrt(1 - a) * x64
        else:
            x0 = m
            eps = (x64 - math.sqrt(a) * x0) / math.sqrt(1 - a)
        if self.clip:
            x0 = np.clip(x0, -self.clip_range, self.clip_range)
        return (math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps).astype(np.float32)
