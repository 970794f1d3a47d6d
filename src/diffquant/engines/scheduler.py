"""Numpy schedulers that read diffusers scheduler configs, so the runtime sampler needs no torch:
DDIM (eta = 0) and flow-matching Euler (shift, dynamic shift). Tested against diffusers'
DDIMScheduler and FlowMatchEulerDiscreteScheduler step for step."""

from __future__ import annotations

import math

import numpy as np

from diffquant.errors import DiffquantError

__all__ = ["NumpyDDIM", "NumpyFlowEuler", "numpy_scheduler"]


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


class NumpyFlowEuler:
    """Flow-matching Euler over a diffusers FlowMatchEulerDiscreteScheduler config: sigmas from
    1 towards 0, shifted by ``shift`` (or by ``mu`` with dynamic shifting), x += (s' - s) * v.
    ``sigmas="linspace"`` starts from linspace(1, 1/N, N) as the Flux pipeline does; otherwise
    from the scheduler's own range, as the SD3 pipeline does."""

    def __init__(self, config: dict, sigmas: str = "scheduler", mu: float | None = None) -> None:
        self.config = dict(config)
        self.num_train = int(self.config.get("num_train_timesteps", 1000))
        self.shift = float(self.config.get("shift", 1.0))
        self.dynamic = bool(self.config.get("use_dynamic_shifting", False))
        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "shift_terminal", "stochastic_sampling"):
            if self.config.get(k):
                raise DiffquantError(f"scheduler option {k} is not supported by the runtime flow-matching sampler")
        if self.dynamic and mu is None:
            raise DiffquantError("a dynamically shifted flow-matching schedule needs mu (runtime.json sampler.mu)")
        self.mode, self.mu = sigmas, mu
        self._sigmas: np.ndarray | None = None

    def _shifted(self, s: np.ndarray) -> np.ndarray:
        if self.dynamic:
            if self.config.get("time_shift_type", "exponential") == "linear":
                return self.mu / (self.mu + (1 / s - 1))
            return math.exp(self.mu) / (math.exp(self.mu) + (1 / s - 1))
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigmas(self, steps: int) -> np.ndarray:
        """The ``steps`` sigmas of a run and the final 0 (float32, as diffusers keeps them)."""
        if not 1 <= steps <= self.num_train:
            raise DiffquantError(f"steps must be 1..{self.num_train}, got {steps}")
        if self.mode == "linspace":
            s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
        else:
            train = (np.linspace(1, self.num_train, self.num_train, dtype=np.float32)[::-1] / self.num_train).astype(np.float32)
            if not self.dynamic:
                train = (self.shift * train / (1 + (self.shift - 1) * train)).astype(np.float32)
            t = np.linspace(float(train[0]) * self.num_train, float(train[-1]) * self.num_train, steps)
            s = t / self.num_train
        s = np.asarray(self._shifted(s), dtype=np.float32)
        return np.append(s, np.float32(0.0))

    def timesteps(self, steps: int) -> np.ndarray:
        self._sigmas = self.sigmas(steps)
        return (self._sigmas[:-1] * self.num_train).astype(np.float32)

    def step(self, model_out: np.ndarray, t: float, x: np.ndarray, steps: int) -> np.ndarray:
        sig = self._sigmas if self._sigmas is not None and len(self._sigmas) == steps + 1 else self.sigmas(steps)
        i = int(np.argmin(np.abs(sig[:-1] * self.num_train - t)))
        return (x.astype(np.float32) + (sig[i + 1] - sig[i]) * model_out.astype(np.float32)).astype(np.float32)


def numpy_scheduler(runtime: dict):
    """The runtime scheduler an exported model samples with (runtime.json ``sampler``)."""
    sampler = runtime.get("sampler", {"kind": "ddim"})
    if sampler["kind"] == "flow":
        return NumpyFlowEuler(runtime["scheduler"], sampler.get("flow_sigmas", "scheduler"), sampler.get("mu"))
    return NumpyDDIM(runtime["scheduler"])
