"""End-to-end pipeline parity: images drawn from an engine folder (tokenizers, text encoders,
denoiser engines, numpy scheduler, VAE decoder) against the diffusers FP pipeline drawing the
same prompts from the same starting noise with the same scheduler, steps and guidance.

With FP engines only numerics differ, so PSNR must reach ``fp_threshold_db`` (40 dB); with the
quantized denoiser PSNR / SSIM are reported (and judged only against ``qdq_threshold_db``)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffquant.engines.deployed import PipelineFromFolder, PipelineRequest
from diffquant.engines.runtime import GenerateConfig, initial_noise
from diffquant.engines.scheduler import scheduler_kind
from diffquant.errors import DiffquantError
from diffquant.eval.quality import psnr, ssim

__all__ = ["ImageVerdict", "PipelineCheckConfig", "compare_pipeline", "reference_images"]


@dataclass
class PipelineCheckConfig:
    """Prompts (one image per prompt and seed), seeds, sampler settings (``guidance`` None: the
    family's default), and the PSNR an FP engine folder must reach / a quantized one is held to."""

    prompts: list[str] = field(default_factory=lambda: ["a red cat on a sofa", "a lighthouse at dusk"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 20
    guidance: float | None = None
    fp_threshold_db: float = 40.0
    qdq_threshold_db: float = 0.0


@dataclass
class ImageVerdict:
    engine: str
    prompt: str
    seed: int
    psnr_db: float
    ssim: float
    threshold_db: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _reference_pipeline(pipe, kind: str):
    """The diffusers pipeline with the scheduler the runtime samples with (its own type where the
    runtime has it; DDIM on the same schedule otherwise)."""
    import diffusers

    cls = {
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "dpm++": "DPMSolverMultistepScheduler",
        "flow": "FlowMatchEulerDiscreteScheduler",
    }[kind]
    if type(pipe.scheduler).__name__ != cls:
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config)
    return pipe


def reference_images(
    pipe, family, prompt: str, noise: np.ndarray, steps: int, guidance: float, size: tuple[int, int]
) -> np.ndarray:
    """The diffusers pipeline's images [N, C, H, W] in [-1, 1] for one prompt per row of ``noise``."""
    kwargs = family.reference_call([prompt] * len(noise))
    if kwargs is None:
        raise DiffquantError(
            f"the {family.name} pipeline has no deterministic reference (it samples with fresh noise each step)"
        )
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(
            **kwargs,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=torch.from_numpy(noise),
            output_type="np",
            height=size[0],
            width=size[1],
        ).images
    return np.asarray(out, np.float32).transpose(0, 3, 1, 2) * 2 - 1


def compare_pipeline(
    pipe, family, engines: dict[str, str | Path], cfg: PipelineCheckConfig | None = None
) -> list[ImageVerdict]:
    """PSNR / SSIM of each engine folder's images (``{"fp": folder, "qdq": folder}``) against
    the diffusers pipeline ``pipe`` (FP32), per prompt, over ``cfg.seeds``."""
    cfg = cfg or PipelineCheckConfig()
    rows: list[ImageVerdict] = []
    refs: dict[str, np.ndarray] = {}
    for label, folder in engines.items():
        with PipelineFromFolder(folder) as dp:
            guidance = family.default_guidance if cfg.guidance is None else cfg.guidance
            ref_pipe = _reference_pipeline(pipe, scheduler_kind(dp.runtime.sampler, dp.runtime.scheduler))
            shape = tuple(dp.runtime.sample_shape)
            for prompt in cfg.prompts:
                ours = np.concatenate(
                    [
                        dp(
                            PipelineRequest(
                                [prompt], 1, None, GenerateConfig(steps=cfg.steps, guidance=guidance, seed=s, batch=1)
                            )
                        )
                        for s in cfg.seeds
                    ]
                )
                if prompt not in refs:
                    noise = np.concatenate([initial_noise(s, 1, shape) for s in cfg.seeds])
                    refs[prompt] = reference_images(ref_pipe, family, prompt, noise, cfg.steps, guidance, dp.resolution)
                thr = cfg.fp_threshold_db if label == "fp" else cfg.qdq_threshold_db
                for i, s in enumerate(cfg.seeds):
                    a, b = torch.from_numpy(ours[i : i + 1]), torch.from_numpy(refs[prompt][i : i + 1])
                    p = psnr(a, b)
                    rows.append(ImageVerdict(label, prompt, s, p, ssim(a, b), thr, p >= thr))
    return rows
