"""The torch-free runtime sampler: DDIM with classifier-free guidance in numpy, driving any
`Engine` (ONNX Runtime or TensorRT), with the exported prompt table as conditioning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffquant.engines.base import Engine
from diffquant.engines.scheduler import NumpyDDIM
from diffquant.errors import DiffquantError

__all__ = ["GenerateConfig", "PromptTable", "generate"]


class PromptTable:
    """Prompt id -> conditioning (embedding sequence or class label), exported by the
    quantizer so the runtime needs no text encoder; ``null_id`` is the empty prompt."""

    def __init__(self, table: np.ndarray, words: list[str], null_id: int) -> None:
        self.table, self.words, self.null_id = table, list(words), int(null_id)

    @classmethod
    def from_runtime(cls, folder: str | Path, runtime: dict) -> PromptTable:
        from safetensors.numpy import load_file

        info = runtime["conditioning"]
        path = Path(folder) / info["file"]
        if not path.exists():
            raise DiffquantError(f"conditioning file {path} is missing; export and build the engine folder again")
        return cls(load_file(str(path))["table"], info.get("words", []), info["null_id"])

    def prompt_id(self, prompt: str) -> int:
        """The id of a class word (``seven``) or index (``7``); unknown prompts are an error."""
        p = prompt.strip().lower()
        if p in self.words:
            return self.words.index(p)
        if p.isdigit() and int(p) < self.null_id:
            return int(p)
        known = ", ".join(self.words) if self.words else f"0..{self.null_id - 1}"
        raise DiffquantError(f"this model does not know the prompt {prompt!r}; known prompts: {known}")

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(ids, dtype=np.int64)]


@dataclass
class GenerateConfig:
    """Sampling settings (the model's training schedule comes from runtime.json)."""

    steps: int = 25
    guidance: float = 3.0
    seed: int = 0
    batch: int = 16


def _feed(engine: Engine, x: np.ndarray, t: float, cond: np.ndarray) -> dict[str, np.ndarray]:
    n = len(x)
    return {
        "sample": x.astype(engine.input_dtype("sample")),
        "timestep": np.full(n, t, dtype=engine.input_dtype("timestep")),
        "cond": cond.astype(engine.input_dtype("cond")),
    }


def generate(engine: Engine, runtime: dict, prompts: PromptTable, ids: list[int], cfg: GenerateConfig, progress: bool = True) -> np.ndarray:
    """Sample one image per prompt id in ``ids``; returns [N, C, H, W] clipped to [-1, 1]."""
    from tqdm.auto import tqdm

    sched = NumpyDDIM(runtime["scheduler"])
    shape = tuple(runtime["sample_shape"])
    out_name = runtime.get("output", "noise_pred")
    noise = np.random.default_rng(cfg.seed).standard_normal((len(ids), *shape)).astype(np.float32)
    guided = cfg.guidance > 1.0
    # with CFG each image takes two rows of the engine batch (conditional + unconditional)
    limit = getattr(engine, "max_batch", 0) or 1 << 30
    per = max(1, min(cfg.batch, limit // 2 if guided else limit))
    timesteps = sched.timesteps(cfg.steps)
    images = []
    bar = tqdm(total=len(timesteps) * ((len(ids) + per - 1) // per), desc="generate", disable=not progress, leave=False)
    for i in range(0, len(ids), per):
        x = noise[i : i + per]
        cond = prompts(ids[i : i + per])
        uncond = prompts(np.full(len(x), prompts.null_id))
        for t in timesteps:
            if guided:
                eps = engine.run(_feed(engine, np.concatenate([x, x]), float(t), np.concatenate([cond, uncond])), [out_name])[out_name].astype(np.float32)
                ec, eu = eps[: len(x)], eps[len(x) :]
                eps = eu + cfg.guidance * (ec - eu)
            else:
                eps = engine.run(_feed(engine, x, float(t), cond), [out_name])[out_name].astype(np.float32)
            x = sched.step(eps, int(t), x, cfg.steps)
            bar.update()
        images.append(np.clip(x, -1.0, 1.0))
    bar.close()
    return np.concatenate(images)
