"""Numpy schedulers that read diffusers scheduler configs, so the runtime sampler needs no torch:
DDIM (eta = 0), Euler (discrete sigmas), DPM-Solver++ (2M, multistep) and flow-matching Euler
(shift, dynamic shift). Tested against diffusers' DDIMScheduler, EulerDiscreteScheduler,
DPMSolverMultistepScheduler and FlowMatchEulerDiscreteScheduler step for step.

Every scheduler has ``timesteps(steps)``, ``init_noise_sigma(steps)`` (what the pipeline
multiplies the starting noise by), ``scale_input(x, t)``, ``reset()`` (multistep history) and
``step(model_out, t, x, steps)``."""

from __future__ import annotations

import math

import numpy as np

from diffquant.artifacts import SamplerEntry
from diffquant.errors import DiffquantError

__all__ = [
    "SCHEDULERS",
    "NumpyDDIM",
    "NumpyDPMSolver",
    "NumpyEuler",
    "NumpyFlowEuler",
    "numpy_scheduler",
    "scheduler_kind",
]


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
    raise DiffquantError(
        f"beta_schedule {kind!r} is not supported by the runtime sampler (linear, scaled_linear, squaredcos_cap_v2)"
    )


class _Schedule:
    """Defaults of every scheduler: unit initial noise, no input scaling, no history."""

    def init_noise_sigma(self, steps: int) -> float:
        return 1.0

    def scale_input(self, x: np.ndarray, t: float) -> np.ndarray:
        return x

    def reset(self) -> None:
        pass


class _Discrete(_Schedule):
    """What the discrete-time schedulers share: the float32 cumulative alphas of the config's
    beta schedule and the prediction type."""

    def __init__(self, config: dict) -> None:
        self.config = dict(config)
        self.num_train = int(self.config.get("num_train_timesteps", 1000))
        betas = _betas(self.config).astype(np.float32)  # diffusers keeps the schedule in float32
        self.alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32).astype(np.float64)
        self.prediction = self.config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise DiffquantError(f"prediction_type {self.prediction!r} is not supported by the runtime sampler")

    def _refuse(self, keys: tuple[str, ...], what: str) -> None:
        for k in keys:
            if self.config.get(k):
                raise DiffquantError(
                    f"scheduler option {k} is not supported by the runtime {what}; pass --scheduler ddim to sample "
                    "with DDIM instead"
                )

    def _sigmas(self, timesteps: np.ndarray) -> np.ndarray:
        """Karras sigmas sqrt((1 - a) / a) at ``timesteps`` (interpolated), then 0, in float32."""
        ac = self.alphas_cumprod.astype(np.float32)
        train = ((1 - ac) / ac) ** 0.5
        return np.append(np.interp(timesteps, np.arange(len(train)), train), 0.0).astype(np.float32)


class NumpyDDIM(_Discrete):
    """Deterministic DDIM over a diffusers-style config: ``timesteps(steps)`` and ``step``."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.final_alpha = 1.0 if self.config.get("set_alpha_to_one", True) else float(self.alphas_cumprod[0])
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
        t = int(t)
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


class NumpyEuler(_Discrete):
    """Euler over Karras sigmas at the config's timesteps (diffusers' EulerDiscreteScheduler with
    s_churn 0, linear interpolation, the final sigma 0): x += (x - x0) / sigma * (sigma' - sigma)."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self._refuse(
            ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr"),
            "Euler sampler",
        )
        if (
            self.config.get("interpolation_type", "linear") != "linear"
            or self.config.get("timestep_type", "discrete") != "discrete"
        ):
            raise DiffquantError(
                "only Euler with linear interpolation and discrete timesteps is supported by the runtime; pass "
                "--scheduler ddim"
            )
        self._ts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _schedule(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        if steps not in self._ts:
            if not 1 <= steps <= self.num_train:
                raise DiffquantError(f"steps must be 1..{self.num_train}, got {steps}")
            spacing, n = self.config.get("timestep_spacing", "linspace"), self.num_train
            if spacing == "linspace":
                ts = np.linspace(0, n - 1, steps, dtype=np.float64)[::-1].copy()
            elif spacing == "leading":
                ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.float64) + int(
                    self.config.get("steps_offset", 0)
                )
            elif spacing == "trailing":
                ts = np.arange(n, 0, -n / steps).round().astype(np.float64) - 1
            else:
                raise DiffquantError(f"timestep_spacing {spacing!r} is not supported by the runtime sampler")
            self._ts[steps] = (ts.astype(np.float32), self._sigmas(ts))
        return self._ts[steps]

    def timesteps(self, steps: int) -> np.ndarray:
        self._steps = steps
        return self._schedule(steps)[0]

    def init_noise_sigma(self, steps: int) -> float:
        top = float(self._schedule(steps)[1].max())
        return (
            top if self.config.get("timestep_spacing", "linspace") in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        )

    def _sigma(self, t: float, steps: int) -> tuple[float, float]:
        ts, sig = self._schedule(steps)
        i = int(np.argmin(np.abs(ts - t)))
        return float(sig[i]), float(sig[i + 1])

    def scale_input(self, x: np.ndarray, t: float) -> np.ndarray:
        s, _ = self._sigma(float(t), self._steps)
        return (x / (s * s + 1) ** 0.5).astype(np.float32)

    def step(self, model_out: np.ndarray, t: float, x: np.ndarray, steps: int) -> np.ndarray:
        s, s_next = self._sigma(float(t), steps)
        x32, m = x.astype(np.float32), model_out.astype(np.float32)
        if self.prediction == "epsilon":
            x0 = x32 - s * m
        elif self.prediction == "v_prediction":
            x0 = m * (-s / (s * s + 1) ** 0.5) + x32 / (s * s + 1)
        else:
            x0 = m
        return (x32 + (x32 - x0) / s * (s_next - s)).astype(np.float32)


class NumpyDPMSolver(_Discrete):
    """DPM-Solver++ (2M, midpoint; diffusers' DPMSolverMultistepScheduler defaults): data
    predictions, second order from the second step on, first order at the last (final sigma 0)."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self._refuse(
            (
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "thresholding",
                "rescale_betas_zero_snr",
                "euler_at_final",
                "use_flow_sigmas",
            ),
            "DPM-Solver++ sampler",
        )
        want = {
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "solver_order": 2,
            "final_sigmas_type": "zero",
            "lower_order_final": True,
        }
        for k, v in want.items():
            if self.config.get(k, v) != v:
                raise DiffquantError(
                    f"DPM-Solver {k}={self.config[k]!r} is not supported by the runtime (only {v!r}); pass "
                    "--scheduler ddim"
                )
        self.reset()

    def reset(self) -> None:
        self.history: list[np.ndarray] = []

    def timesteps(self, steps: int) -> np.ndarray:
        if not 1 <= steps <= self.num_train:
            raise DiffquantError(f"steps must be 1..{self.num_train}, got {steps}")
        spacing, n = self.config.get("timestep_spacing", "linspace"), self.num_train
        if spacing == "linspace":
            ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1] + int(
                self.config.get("steps_offset", 0)
            )
        elif spacing == "trailing":
            ts = np.arange(n, 0, -n / steps).round() - 1
        else:
            raise DiffquantError(f"timestep_spacing {spacing!r} is not supported by the runtime sampler")
        self.ts, self.sig = ts.astype(np.int64), self._sigmas(ts.astype(np.int64))
        return self.ts

    @staticmethod
    def _alpha_sigma(s: float) -> tuple[float, float]:
        a = 1.0 / (s * s + 1) ** 0.5
        return a, s * a

    def step(self, model_out: np.ndarray, t: float, x: np.ndarray, steps: int) -> np.ndarray:
        if getattr(self, "ts", None) is None or len(self.ts) != steps:
            self.timesteps(steps)
        i = int(np.argmin(np.abs(self.ts - t)))
        a_s, s_s = self._alpha_sigma(float(self.sig[i]))
        x32, m = x.astype(np.float64), model_out.astype(np.float64)
        x0 = (
            (x32 - s_s * m) / a_s
            if self.prediction == "epsilon"
            else a_s * x32 - s_s * m
            if self.prediction == "v_prediction"
            else m
        )
        self.history = [*self.history[-1:], x0]
        a_t, s_t = self._alpha_sigma(float(self.sig[i + 1]))
        last = i == len(self.ts) - 1
        first_order = len(self.history) < 2 or last
        if s_t == 0:
            return x0.astype(np.float32)
        h = (math.log(a_t) - math.log(s_t)) - (math.log(a_s) - math.log(s_s))
        out = (s_t / s_s) * x32 - a_t * (math.exp(-h) - 1) * x0
        if not first_order:
            a_p, s_p = self._alpha_sigma(float(self.sig[i - 1]))
            r0 = ((math.log(a_s) - math.log(s_s)) - (math.log(a_p) - math.log(s_p))) / h
            out -= 0.5 * a_t * (math.exp(-h) - 1) * (x0 - self.history[0]) / r0
        return out.astype(np.float32)


class NumpyFlowEuler(_Schedule):
    """Flow-matching Euler over a diffusers FlowMatchEulerDiscreteScheduler config: sigmas from
    1 towards 0, shifted by ``shift`` (or by ``mu`` with dynamic shifting), x += (s' - s) * v.
    ``sigmas="linspace"`` starts from linspace(1, 1/N, N) as the Flux pipeline does; otherwise
    from the scheduler's own range, as the SD3 pipeline does."""

    def __init__(self, config: dict, sigmas: str = "scheduler", mu: float | None = None) -> None:
        self.config = dict(config)
        self.num_train = int(self.config.get("num_train_timesteps", 1000))
        self.shift = float(self.config.get("shift", 1.0))
        self.dynamic = bool(self.config.get("use_dynamic_shifting", False))
        for k in (
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "shift_terminal",
            "stochastic_sampling",
        ):
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
            train = (np.linspace(1, self.num_train, self.num_train, dtype=np.float32)[::-1] / self.num_train).astype(
                np.float32
            )
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


SCHEDULERS = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm++",
    "FlowMatchEulerDiscreteScheduler": "flow",
}


def scheduler_kind(sampler: SamplerEntry, scheduler: dict, asked: str = "auto") -> str:
    """The numpy scheduler a run uses: ``asked``, or with ``auto`` the pipeline's own type where
    it has a numpy form (DDIM, Euler, DPM-Solver++, flow Euler), else DDIM on its schedule
    (``sampler`` and ``scheduler``: runtime.json's sections)."""
    if sampler.kind == "flow":
        if asked not in ("auto", "flow"):
            raise DiffquantError(
                f"--scheduler {asked}: a flow-matching model samples with the flow Euler scheduler only"
            )
        return "flow"
    if asked == "flow":
        raise DiffquantError("--scheduler flow is for flow-matching models; this one has a discrete (beta) schedule")
    if asked != "auto":
        return asked
    return SCHEDULERS.get(scheduler.get("_class_name", ""), "ddim")


def numpy_scheduler(sampler: SamplerEntry, scheduler: dict, asked: str = "auto"):
    """The runtime scheduler an exported model samples with (see `scheduler_kind`)."""
    kind = scheduler_kind(sampler, scheduler, asked)
    if kind == "flow":
        return NumpyFlowEuler(scheduler, sampler.flow_sigmas, sampler.mu)
    return {"ddim": NumpyDDIM, "euler": NumpyEuler, "dpm++": NumpyDPMSolver}[kind](scheduler)
