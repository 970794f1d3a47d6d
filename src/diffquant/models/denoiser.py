"""The `Denoiser`: a diffusers denoiser behind its family adapter, called with named inputs, with
the prompt table its pipeline's text encoders produced and (for latent models) the VAE decoder."""

from __future__ import annotations

import torch
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.models.families import Family
from diffquant.models.families.text import TextPlan
from diffquant.models.inputs import InputSpec, NamedInputs

__all__ = ["Denoiser", "decode_latents"]


def decode_latents(vae: nn.Module, family: Family, x: torch.Tensor) -> torch.Tensor:
    """Sampler output -> images in [-1, 1]: unpacked to the VAE's layout, unscaled, decoded
    (the exported VAE-decoder graph is this function)."""
    lat = family.image_latents(x)
    cfg = vae.config
    lat = lat / cfg.scaling_factor + (cfg.get("shift_factor", None) or 0.0)
    return vae.decode(lat, return_dict=False)[0].clamp(-1, 1)


class _Shared:
    """Pipeline parts a denoiser uses but never quantizes (the VAE, the text encoders and their
    tokenizers): shared, not copied, by the deep copies that fake-quant models are made from."""

    def __init__(self, **parts) -> None:
        self.parts = parts

    def __deepcopy__(self, memo) -> _Shared:
        return self


class Denoiser(nn.Module):
    """``forward(**named_inputs) -> model output`` for any supported family.

    ``conditioning`` maps each conditioning input name to a table with one row per prompt in
    ``prompts`` and the negative / null prompt last (``null_id``), encoded once by the
    pipeline's own text encoders; ``encode(ids)`` looks rows up. ``vae`` decodes latents.
    ``text_plan`` and ``text_parts`` (the pipeline's text encoders and tokenizers by component
    name) are what the exporter writes so that a deployed model takes any prompt.
    """

    output_names = ("noise_pred",)

    def __init__(
        self,
        name: str,
        family: Family,
        model: nn.Module,
        scheduler: dict,
        conditioning: dict[str, torch.Tensor],
        prompts: list[str],
        vae: nn.Module | None = None,
        text: tuple[TextPlan, dict] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.family = family
        self.model = model
        self.scheduler = dict(scheduler)
        self.conditioning = {k: v.detach() for k, v in conditioning.items()}
        self.prompts = list(prompts)
        self.null_id = len(self.prompts)
        self.skip = tuple(family.skip)
        plan, parts = text or (None, {})
        self._shared = _Shared(vae=vae, text_plan=plan, text_parts=dict(parts))
        self.specs = family.input_specs()
        for s in self.specs:
            if s.role == "cond" and s.name not in self.conditioning:
                raise DiffquantError(
                    f"{name}: the {family.name} family needs conditioning {s.name!r}, which its encoders did not "
                    "produce"
                )

    @property
    def vae(self) -> nn.Module | None:
        return self._shared.parts.get("vae")

    @property
    def text_plan(self) -> TextPlan | None:
        return self._shared.parts.get("text_plan")

    @property
    def text_parts(self) -> dict:
        return self._shared.parts.get("text_parts", {})

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.family.sample_shape()

    @property
    def sample_name(self) -> str:
        return self.family.sample_name

    @property
    def batched(self) -> frozenset[str]:
        return frozenset(s.name for s in self.specs if s.batched)

    def input_specs(self) -> list[InputSpec]:
        return list(self.specs)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """Positional inputs follow the spec order (how the ONNX exporter calls it)."""
        inputs = dict(zip((s.name for s in self.specs), args))
        inputs.update(kwargs)
        return self.family.call(self.model, inputs)

    def encode(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditioning rows for prompt ids (``null_id`` is the negative / empty prompt)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        return {k: v[ids] for k, v in self.conditioning.items()}

    def step_inputs(
        self, x: torch.Tensor, t: float, cond: dict[str, torch.Tensor], guidance: float | None = None
    ) -> NamedInputs:
        """The named inputs of one sampler step: latents ``x``, scheduler timestep ``t`` (the
        family converts it), conditioning rows, the guidance scale where it is an input."""
        n = len(x)
        feeds: dict[str, torch.Tensor] = {}
        static = self.family.static_inputs(self.conditioning)
        for s in self.specs:
            if s.role == "sample":
                feeds[s.name] = x
            elif s.role == "timestep":
                feeds[s.name] = torch.full((n,), self.family.model_timestep(t))
            elif s.role == "guidance":
                feeds[s.name] = torch.full(
                    (n,), float(guidance if guidance is not None else self.family.default_guidance)
                )
            elif s.role == "static":
                feeds[s.name] = static[s.name]
            else:
                feeds[s.name] = cond[s.name]
        return NamedInputs(feeds, self.batched)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> NamedInputs:
        """Inputs for tracing and smoke checks: seeded latents, timesteps across the range,
        prompts cycling through the table (the null row included)."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *self.sample_shape, generator=gen)
        t = torch.linspace(10, self.scheduler.get("num_train_timesteps", 1000) - 10, batch)
        ids = torch.arange(batch) % (self.null_id + 1)
        feeds = self.step_inputs(x, 0.0, self.encode(ids))
        feeds["timestep"] = torch.tensor([self.family.model_timestep(float(v)) for v in t])
        return feeds

    def to_images(self, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Final sampler output -> images in [-1, 1]: decoded by the VAE for latent models."""
        vae = self.vae
        if vae is None:
            return x.clamp(-1, 1)
        with torch.no_grad():
            return torch.cat([decode_latents(vae, self.family, x[i : i + batch]) for i in range(0, len(x), batch)])

    def blocks(self) -> list[tuple[str, str]]:
        """(module name, kind) of the reconstruction blocks of this family, outermost first."""
        kinds = self.family.block_types
        out = [(n, type(m).__name__) for n, m in self.model.named_modules() if type(m).__name__ in kinds]
        # a block inside another block (a UNet transformer's own blocks) is not a unit of its own
        return [(n, k) for n, k in out if not any(n.startswith(o + ".") for o, _ in out)]
