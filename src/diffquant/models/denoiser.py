"""The `Denoiser` adapter: one call signature, example inputs, ONNX input specs, block structure
and default high-precision skip list for any supported diffusers denoiser."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffquant.errors import DiffquantError

__all__ = ["Denoiser", "InputSpec"]

# Kept in high precision by default (fnmatch on layer names): first and last layers, time
# embedding and every time_emb_proj, DiT patch embedding, adaLN modulation and final projections.
# The attention Q.K and P.V matmuls are never Conv2d/Linear modules, so they are never targeted.
UNET_SKIP = ("conv_in", "conv_out", "time_embedding.*", "*time_emb_proj")
DIT_SKIP = ("pos_embed.*", "*.norm1.emb.*", "*.norm1.linear", "proj_out_1", "proj_out_2")


@dataclass(frozen=True)
class InputSpec:
    """An ONNX graph input: name, dtype (numpy name), shape with "batch" as the dynamic axis."""

    name: str
    dtype: str
    shape: tuple

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


class Denoiser(nn.Module):
    """Wraps a diffusers UNet2DConditionModel or DiTTransformer2DModel as
    ``forward(sample, timestep, cond) -> noise prediction``.

    ``cond`` is the cross-attention embedding sequence for UNets and the int64 class label for
    DiTs. ``prompts`` (optional) maps prompt ids to conditioning; ``null_id`` is the empty prompt
    / null class used for classifier-free guidance.
    """

    def __init__(
        self,
        name: str,
        family: str,
        model: nn.Module,
        scheduler: dict,
        prompts: nn.Module | None = None,
        words: tuple[str, ...] = (),
        null_id: int = 0,
        cond_shape: tuple = (),
        skip: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if family not in ("unet", "dit"):
            raise DiffquantError(f"unsupported denoiser family {family!r}")
        self.name = name
        self.family = family
        self.model = model
        self.scheduler = dict(scheduler)
        self.prompts = prompts
        self.words = tuple(words)
        self.null_id = null_id
        self.cond_shape = tuple(cond_shape)
        self.skip = tuple(skip)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.model.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.family == "unet":
            return self.model(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]
        return self.model(sample, timestep=timestep, class_labels=cond, return_dict=False)[0]

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Conditioning for prompt ids (class indices; ``null_id`` is the empty prompt)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if self.family == "dit":
            return ids
        if self.prompts is None:
            # a UNet without a shipped prompt encoder: the null prompt is zeros, others are
            # fixed seeded Gaussian embeddings (documented limitation for calibration)
            gen = torch.Generator().manual_seed(1234)
            table = torch.randn(self.null_id + 1, *self.cond_shape, generator=gen)
            table[self.null_id] = 0
            return table[ids]
        with torch.no_grad():
            return self.prompts(ids)

    def prompt_id(self, prompt: str | int) -> int:
        """Prompt id of a class word (or an index); unknown prompts raise a clear error."""
        if isinstance(prompt, int) or (isinstance(prompt, str) and prompt.isdigit()):
            i = int(prompt)
            if 0 <= i < self.null_id:
                return i
        elif prompt in self.words:
            return self.words.index(prompt)
        known = ", ".join(self.words) if self.words else f"0..{self.null_id - 1}"
        raise DiffquantError(f"{self.name} does not know the prompt {prompt!r}; known prompts: {known}")

    def input_specs(self) -> list[InputSpec]:
        c, h, w = self.sample_shape
        if self.family == "unet":
            cond = InputSpec("cond", "float32", ("batch", *self.cond_shape))
        else:
            cond = InputSpec("cond", "int64", ("batch",))
        return [InputSpec("sample", "float32", ("batch", c, h, w)), InputSpec("timestep", "float32", ("batch",)), cond]

    output_names = ("noise_pred",)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *self.sample_shape, generator=gen)
        t = torch.linspace(10, self.scheduler["num_train_timesteps"] - 10, batch)
        ids = torch.arange(batch) % (self.null_id + 1)
        return x, t, self.encode(ids)

    def blocks(self) -> list[tuple[str, str]]:
        """(module name, kind) of the reconstruction blocks: ResBlocks and transformer blocks of
        a UNet, transformer blocks of a DiT."""
        out = []
        for name, mod in self.model.named_modules():
            kind = type(mod).__name__
            if kind in ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock") and not (
                kind == "BasicTransformerBlock" and self.family == "unet"
            ):
                out.append((name, kind))
        return out
