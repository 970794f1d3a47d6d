"""DDIM sampling with classifier-free guidance over any noise-prediction function.

The function may be the FP torch denoiser, the fake-quant model, or an engine: it receives
(x_t, t, cond) for a batch that holds the conditional and unconditional halves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

__all__ = ["ClassBatch", "EpsFn", "SamplerConfig", "class_batch", "class_ids", "ddim_sample", "initial_noise"]

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SamplerConfig:
    """DDIM settings: steps, guidance scale (<= 1 disables CFG), eta (0: deterministic)."""

    steps: int = 25
    guidance: float = 3.0
    eta: float = 0.0
    batch_size: int = 128


def class_ids(n: int, n_classes: int = 10) -> torch.Tensor:
    """Requested class of each of ``n`` samples: equal per class (0, 1, ..., 9, 0, 1, ...)."""
    return torch.arange(n) % n_classes


def initial_noise(n: int, shape: tuple, seed: int) -> torch.Tensor:
    """The starting noise of ``n`` samples; sample i is the same for every batch size."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen)


@dataclass
class ClassBatch:
    """What the benchmark protocol samples: requested classes, starting noise, and the
    conditional / unconditional conditioning of each sample."""

    ids: torch.Tensor
    noise: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor


def class_batch(denoiser, n: int, seed: int) -> ClassBatch:
    """``n`` samples equal per class with seeded noise, conditioned through ``denoiser.encode``."""
    ids = class_ids(n, max(1, denoiser.null_id))
    return ClassBatch(
        ids=ids,
        noise=initial_noise(n, denoiser.sample_shape, seed),
        cond=denoiser.encode(ids),
        uncond=denoiser.encode(torch.full_like(ids, denoiser.null_id)),
    )


def _scheduler(config: dict, steps: int):
    from diffusers import DDIMScheduler

    # signature() follows the config decorator's __wrapped__ to the real parameters
    accepted = inspect.signature(DDIMScheduler.__init__).parameters
    sched = DDIMScheduler(**{k: v for k, v in config.items() if k in accepted})
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scheduler_config: dict,
    cfg: SamplerConfig,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, slice], None] | None = None,
    desc: str = "sample",
    progress: bool = True,
) -> torch.Tensor:
    """Run DDIM from ``noise`` for every sample; returns the final x_0 in [-1, 1] (clamped).

    ``on_step(step_index, x_in, t_in, cond_in, batch_slice)`` sees the exact model inputs of every
    step (cond and uncond halves concatenated when CFG is on) — this is how calibration data is
    collected.
    """
    n = len(noise)
    out = torch.empty_like(noise)
    use_cfg = cfg.guidance > 1.0
    total = n * cfg.steps
    with tqdm(total=total, desc=desc, unit="img-step", disable=not progress, leave=False) as bar:
        for b0 in range(0, n, cfg.batch_size):
            sl = slice(b0, min(n, b0 + cfg.batch_size))
            sched = _scheduler(scheduler_config, cfg.steps)
            x = noise[sl].clone()
            c, u = cond[sl], uncond[sl]
            for i, t in enumerate(sched.timesteps):
                x_in = torch.cat([x, x]) if use_cfg else x
                c_in = torch.cat([c, u]) if use_cfg else c
                t_in = torch.full((len(x_in),), float(t))
                if on_step is not None:
                    on_step(i, x_in, t_in, c_in, sl)
                eps = eps_fn(x_in, t_in, c_in).float()
                if use_cfg:
                    e_c, e_u = eps.chunk(2)
                    eps = e_u + cfg.guidance * (e_c - e_u)
                x = sched.step(eps, t, x, eta=cfg.eta).prev_sample
                bar.update(len(x))
            out[sl] = x
    return out.clamp(-1, 1)
