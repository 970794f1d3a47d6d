"""Sampling over any noise-prediction function with the pipeline's own schedule: DDIM for
epsilon / v-prediction models, flow-matching Euler (with the scheduler's shift) for SD3 / Flux;
classifier-free guidance, an embedded guidance scale, or none, as the family says.

The function may be the FP torch denoiser, the fake-quant model, or an engine: it receives the
step's `NamedInputs` for a batch that holds the conditional and unconditional halves under CFG.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diffquant.models.inputs import NamedInputs

__all__ = [
    "EpsFn",
    "PromptBatch",
    "SamplerConfig",
    "class_ids",
    "initial_noise",
    "make_scheduler",
    "prompt_batch",
    "sample",
]

EpsFn = Callable[[NamedInputs], torch.Tensor]


@dataclass
class SamplerConfig:
    """Sampler settings: steps, guidance scale (CFG: <= 1 disables it; embedded: the input
    value), eta (DDIM; 0 is deterministic), batch size (images per call)."""

    steps: int = 25
    guidance: float = 3.0
    eta: float = 0.0
    batch_size: int = 128


def class_ids(n: int, n_classes: int = 10) -> torch.Tensor:
    """Requested prompt of each of ``n`` samples: equal per prompt (0, 1, ..., 0, 1, ...)."""
    return torch.arange(n) % n_classes


def initial_noise(n: int, shape: tuple, seed: int) -> torch.Tensor:
    """The starting noise of ``n`` samples; sample i is the same for every batch size."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen)


@dataclass
class PromptBatch:
    """What the protocol samples: requested prompts, starting noise, and the conditional /
    unconditional conditioning rows of each sample."""

    ids: torch.Tensor
    noise: torch.Tensor
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]

    def take(self, sl: slice) -> PromptBatch:
        """Samples ``sl`` of this batch."""
        return PromptBatch(
            self.ids[sl],
            self.noise[sl],
            {k: v[sl] for k, v in self.cond.items()},
            {k: v[sl] for k, v in self.uncond.items()},
        )


def prompt_batch(denoiser, n: int, seed: int) -> PromptBatch:
    """``n`` samples equal per prompt with seeded noise, conditioned through ``denoiser.encode``."""
    ids = class_ids(n, max(1, denoiser.null_id))
    return PromptBatch(
        ids=ids,
        noise=initial_noise(n, denoiser.sample_shape, seed),
        cond=denoiser.encode(ids),
        uncond=denoiser.encode(torch.full_like(ids, denoiser.null_id)),
    )


def make_scheduler(denoiser, steps: int):
    """The diffusers scheduler the family samples with, set to ``steps`` steps."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    config = {k: v for k, v in denoiser.scheduler.items() if not k.startswith("_")}
    cls = FlowMatchEulerDiscreteScheduler if denoiser.family.sampler == "flow" else DDIMScheduler
    # signature() follows the config decorator's __wrapped__ to the real parameters
    accepted = inspect.signature(cls.__init__).parameters
    sched = cls(**{k: v for k, v in config.items() if k in accepted})
    if denoiser.family.sampler == "flow":
        sched.set_timesteps(steps, **denoiser.family.flow_kwargs(steps, config))
    else:
        sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample(
    eps_fn: EpsFn,
    denoiser,
    batch: PromptBatch,
    cfg: SamplerConfig,
    *,
    on_step: Callable[[int, NamedInputs, slice], None] | None = None,
    desc: str = "sample",
    progress: bool = True,
) -> torch.Tensor:
    """Run the family's sampler from ``batch.noise``; returns the final latents (or pixels:
    `Denoiser.to_images` turns them into images).

    ``on_step(step_index, inputs, batch_slice)`` sees the exact model inputs of every step (the
    conditional and unconditional halves concatenated under CFG): calibration data collection.
    """
    fam = denoiser.family
    n = len(batch.noise)
    out = torch.empty_like(batch.noise)
    use_cfg = fam.guidance == "cfg" and cfg.guidance > 1.0
    flow = fam.sampler == "flow"
    with tqdm(total=n * cfg.steps, desc=desc, unit="img-step", disable=not progress, leave=False) as bar:
        for b0 in range(0, n, cfg.batch_size):
            sl = slice(b0, min(n, b0 + cfg.batch_size))
            sched = make_scheduler(denoiser, cfg.steps)
            part = batch.take(sl)
            x = part.noise.clone()
            cond = {k: torch.cat([part.cond[k], part.uncond[k]]) for k in part.cond} if use_cfg else part.cond
            for i, t in enumerate(sched.timesteps):
                x_in = torch.cat([x, x]) if use_cfg else x
                inputs = denoiser.step_inputs(x_in, float(t), cond, cfg.guidance)
                if on_step is not None:
                    on_step(i, inputs, sl)
                eps = eps_fn(inputs).float()
                if use_cfg:
                    e_c, e_u = eps.chunk(2)
                    eps = e_u + cfg.guidance * (e_c - e_u)
                x = sched.step(eps, t, x).prev_sample if flow else sched.step(eps, t, x, eta=cfg.eta).prev_sample
                bar.update(len(x))
            out[sl] = x
    return out
