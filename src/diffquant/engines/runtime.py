"""The torch-free runtime sampler: the pipeline's scheduler in numpy with classifier-free
guidance, driving any `Engine` (ONNX Runtime, OpenVINO or TensorRT), conditioned on rows of the
exported prompt table or on prompts encoded by the folder's text encoders (`engines.text`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffquant._check import contained
from diffquant.artifacts import RUNTIME_FILE, RuntimeSpec
from diffquant.engines.base import Engine
from diffquant.errors import DiffquantError

__all__ = ["Conditioning", "GenerateConfig", "PromptTable", "generate", "initial_noise"]


class PromptTable:
    """Prompt id -> conditioning inputs (one table per conditioning input: text embeddings,
    pooled embeddings, masks, time ids, class labels), exported by the quantizer so the runtime
    needs no text encoder; ``null_id`` is the negative / empty prompt. Static inputs ride along."""

    def __init__(
        self,
        tables: dict[str, np.ndarray],
        prompts: list[str],
        null_id: int,
        static: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.tables, self.prompts, self.null_id = tables, list(prompts), int(null_id)
        self.static = static or {}

    @classmethod
    def from_runtime(cls, folder: str | Path, runtime: RuntimeSpec) -> PromptTable:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        where, again = f"{Path(folder) / RUNTIME_FILE}: conditioning", "export and build the engine folder again"
        info = runtime.conditioning
        path = contained(folder, info.file, f"{where}.file")
        null_id, prompts = info.null_id, info.prompts
        if not path.exists():
            raise DiffquantError(f"conditioning file {path} is missing; {again}")
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DiffquantError(f"conditioning file {path} is unreadable ({e}); {again}") from None
        tables = {k[5:]: v for k, v in data.items() if k.startswith("cond.")}
        static = {k[7:]: v for k, v in data.items() if k.startswith("static.")}
        for name, table in tables.items():
            if table.ndim < 1 or table.shape[0] != null_id + 1:
                raise DiffquantError(
                    f"{path}: cond.{name} has {table.shape[0] if table.ndim else 0} rows, runtime.json expects "
                    f"{null_id + 1} "
                    f"(null_id {null_id} + 1); {again}"
                )
        return cls(tables, prompts, null_id, static)

    def prompt_id(self, prompt: str) -> int:
        """The id of a calibrated prompt (or a class word such as ``seven``), or an index."""
        p = prompt.strip()
        for i, known in enumerate(self.prompts):
            if p == known or p.lower() == known.lower():
                return i
        if p.isdigit() and int(p) < self.null_id:
            return int(p)
        known = "; ".join(self.prompts[:10]) + (" ..." if len(self.prompts) > 10 else "")
        raise DiffquantError(
            f"this model does not know the prompt {prompt!r}: the engine folder holds conditioning for its calibrated "
            f"prompts only (text encoders are not deployed yet); known prompts: {known}"
        )

    def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(ids, dtype=np.int64)
        return {k: v[idx] for k, v in self.tables.items()}


@dataclass
class Conditioning:
    """What one sampling run is conditioned on: a conditional and an unconditional row per image
    (every conditioning input), and the inputs shared by all (no batch axis)."""

    cond: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray]
    static: dict[str, np.ndarray]

    @classmethod
    def from_table(cls, table: PromptTable, ids: list[int]) -> Conditioning:
        return cls(table(ids), table(np.full(len(ids), table.null_id)), table.static)


def initial_noise(seed: int, n: int, shape: tuple) -> np.ndarray:
    """The starting noise of ``n`` samples: image i from its own stream ``(seed, i)``, so an image
    does not change with the batch or the number of images asked for."""
    return (
        np.stack([np.random.default_rng([seed, i]).standard_normal(shape).astype(np.float32) for i in range(n)])
        if n
        else np.zeros((0, *shape), np.float32)
    )


@dataclass
class GenerateConfig:
    """Sampling settings (the model's schedule comes from runtime.json); ``guidance`` None is
    the family's default."""

    steps: int = 25
    guidance: float | None = 3.0
    seed: int = 0
    batch: int = 16
    scheduler: str = "auto"


def _feeds(
    engine: Engine,
    runtime: RuntimeSpec,
    x: np.ndarray,
    t: float,
    cond: dict[str, np.ndarray],
    static: dict,
    guidance: float,
) -> dict[str, np.ndarray]:
    """One step's named inputs, from runtime.json's input specs and roles."""
    n, scale = len(x), runtime.sampler.timestep_scale
    feeds = {}
    for spec in runtime.inputs:
        name, role = spec.name, spec.role
        if role == "sample":
            v = x
        elif role == "timestep":
            v = np.full(n, t * scale)
        elif role == "guidance":
            v = np.full(n, guidance)
        elif role == "static":
            v = static[name]
        else:
            v = cond[name]
        feeds[name] = np.asarray(v).astype(engine.input_dtype(name))
    return feeds


def generate(
    engine: Engine,
    runtime: RuntimeSpec,
    conditioning: Conditioning,
    n: int,
    cfg: GenerateConfig,
    *,
    progress: bool = True,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Sample ``n`` outputs (row i of ``conditioning`` for image i; an unconditional model has
    no rows) with the model's own sampler from ``noise`` (default: `initial_noise` of
    ``cfg.seed``); returns the final latents [N, ...] (pixel models: images clipped to [-1, 1])."""
    from tqdm.auto import tqdm

    from diffquant.engines.scheduler import numpy_scheduler

    sched = numpy_scheduler(runtime.sampler, runtime.scheduler, cfg.scheduler)
    sampler = runtime.sampler
    shape = tuple(runtime.sample_shape)
    out_name = runtime.output
    guidance = float(sampler.default_guidance if cfg.guidance is None else cfg.guidance)
    noise = (initial_noise(cfg.seed, n, shape) if noise is None else noise) * np.float32(
        sched.init_noise_sigma(cfg.steps)
    )
    guided = sampler.guidance == "cfg" and guidance > 1.0
    # with CFG each image takes two rows of the engine batch (conditional + unconditional)
    limit = getattr(engine, "max_batch", 0) or 1 << 30
    per = max(1, min(cfg.batch, limit // 2 if guided else limit))
    timesteps = sched.timesteps(cfg.steps)
    outs = []
    bar = tqdm(total=len(timesteps) * ((n + per - 1) // per), desc="generate", disable=not progress, leave=False)
    for i in range(0, n, per):
        x = noise[i : i + per]
        cond = {k: v[i : i + per] for k, v in conditioning.cond.items()}
        if guided:
            cond = {k: np.concatenate([cond[k], conditioning.uncond[k][i : i + per]]) for k in cond}
        sched.reset()
        for t in timesteps:
            x_in = sched.scale_input(x, t)
            x_in = np.concatenate([x_in, x_in]) if guided else x_in
            eps = engine.run(_feeds(engine, runtime, x_in, float(t), cond, conditioning.static, guidance), [out_name])[
                out_name
            ].astype(np.float32)
            if guided:
                ec, eu = eps[: len(x)], eps[len(x) :]
                eps = eu + guidance * (ec - eu)
            x = sched.step(eps, t, x, cfg.steps)
            bar.update()
        outs.append(x if runtime.latent else np.clip(x, -1.0, 1.0))
    bar.close()
    return np.concatenate(outs)
