"""The `Family` adapter: everything that differs between diffusers model families, in one place.

An adapter declares the denoiser's named inputs (shapes, dtypes, dynamic axes, roles), calls the
diffusers module with them, post-processes its output (learned-sigma split), builds the
conditioning rows from prompts with the pipeline's own tokenizers and text encoders, and names
the sampler, the guidance mode, the keep-in-FP16 defaults and the reconstruction blocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.models.families.text import TextPlan
from diffquant.models.inputs import InputSpec

__all__ = ["Family", "calculate_shift", "chunked"]


def calculate_shift(
    seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """Resolution-dependent shift mu of flow-matching schedules (linear in the image token count)."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq_len * m + base_shift - m * base_seq


def chunked(fn, prompts: list[str], size: int = 16) -> list:
    """Call ``fn(prompts[i:i+size])`` per chunk: text encoders on a few prompts at a time."""
    return [fn(prompts[i : i + size]) for i in range(0, len(prompts), size)]


class Family(ABC):
    """Base adapter. Subclasses set the class attributes and override what differs.

    ``sampler``: ``ddim`` (epsilon / v-prediction / sample models, on the pipeline's beta
    schedule) or ``flow`` (flow-matching Euler with the scheduler's shift). ``guidance``: ``cfg``
    (a conditional and an unconditional copy per sample), ``embedded`` (guidance-distilled: the
    scale is an input) or ``none``.
    """

    name = "base"
    classes: tuple[str, ...] = ()
    sample_name = "hidden_states"
    sampler = "ddim"
    guidance = "cfg"
    skip: tuple[str, ...] = ()
    block_types: tuple[str, ...] = ()
    default_guidance = 5.0
    feature_model = False  # the digits classifier scores its samples (FD, accuracy)
    prompt_separator = ""  # `generate --prompt a,b,c` takes several prompts (class words) when set

    @property
    def patch(self) -> int:
        """Latent pixels per token side (1 for UNets; Flux packs 2x2 itself and overrides it)."""
        return int(self.config.get("patch_size", None) or 1)

    def __init__(self, model: nn.Module, pipe=None, resolution: tuple[int, int] | None = None) -> None:
        self.config = model.config
        self.pipe_class = type(pipe).__name__ if pipe is not None else ""
        vae = getattr(pipe, "vae", None)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.resolution = tuple(resolution) if resolution else self.default_resolution()
        for side in self.resolution:
            if side % (self.vae_scale * self.patch) or side <= 0:
                raise DiffquantError(
                    f"resolution {self.resolution[0]}x{self.resolution[1]} does not fit {self.name}: each side must "
                    "be a positive "
                    f"multiple of {self.vae_scale * self.patch} (VAE factor {self.vae_scale} x patch {self.patch}); "
                    "pass --resolution"
                )

    def default_resolution(self) -> tuple[int, int]:
        """The pipeline's default image size: the denoiser's sample size times the VAE factor."""
        size = self.config.get("sample_size", None) or 64
        size = size if isinstance(size, int) else size[0]
        return (size * self.vae_scale, size * self.vae_scale)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return (self.resolution[0] // self.vae_scale, self.resolution[1] // self.vae_scale)

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one latent (without batch), as the denoiser takes it."""
        return (self.config.in_channels, *self.latent_hw)

    def image_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Latents in the VAE's [B, C, H, W] layout (Flux unpacks its token sequence)."""
        return x

    def base_specs(self) -> list[InputSpec]:
        return [
            InputSpec(self.sample_name, "float32", ("batch", *self.sample_shape()), "sample"),
            InputSpec("timestep", "float32", ("batch",), "timestep"),
        ]

    def input_specs(self) -> list[InputSpec]:
        """The denoiser's inputs in graph order (the sample first)."""
        return self.base_specs()

    @abstractmethod
    def call(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """Run the diffusers module on named inputs; returns the model output the sampler uses."""

    def split_learned_sigma(self, out: torch.Tensor) -> torch.Tensor:
        """Models trained with learned variance output [eps, sigma]; the sampler takes eps."""
        c = self.config.in_channels
        return out[:, :c] if out.shape[1] == 2 * c else out

    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning rows: one per prompt, then the negative / null row last."""
        return {}

    def text_plan(self, pipe) -> TextPlan | None:
        """How the pipeline's text encoders make the conditioning, as data the deployed runtime
        repeats without torch (None: no text encoder; the prompt table is the conditioning)."""
        return None

    def reference_call(self, prompts: list[str]) -> dict | None:
        """Keyword arguments for a call of the diffusers pipeline that draws ``prompts`` as the
        deployed runtime does (the reference of the pipeline parity check); None where the
        pipeline has no deterministic equivalent."""
        return {"prompt": prompts}

    def static_inputs(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs shared by every sample (no batch axis)."""
        return {}

    def model_timestep(self, t: float) -> float:
        """The scheduler's timestep as the denoiser is fed it (Flux takes t / 1000)."""
        return float(t)

    def flow_kwargs(self, steps: int, scheduler: dict) -> dict:
        """Extra ``set_timesteps`` arguments of a flow-matching schedule (sigmas, mu)."""
        return {}

    def default_prompts(self) -> list[str] | None:
        """Prompts when the user gives none (None: the shipped text prompt list)."""
        return None

    def describe(self) -> dict:
        """What the report says about this family."""
        return {
            "family": self.name,
            "sampler": self.sampler,
            "guidance": self.guidance,
            "resolution": list(self.resolution),
        }
