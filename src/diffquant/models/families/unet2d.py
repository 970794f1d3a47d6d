"""Unconditional DDPM-style `UNet2DModel` (pixel space or latent): no conditioning, no guidance."""

from __future__ import annotations

import torch

from diffquant.errors import DiffquantError
from diffquant.models.families.base import Family
from diffquant.models.families.sd import UNET_SKIP

__all__ = ["UnconditionalUNet"]


class UnconditionalUNet(Family):
    name = "unet2d"
    classes = ("UNet2DModel",)
    sample_name = "sample"
    guidance = "none"
    skip = UNET_SKIP
    block_types = ("ResnetBlock2D", "Attention")

    def __init__(self, model, pipe=None, resolution=None) -> None:
        if model.config.get("class_embed_type") or model.config.get("num_class_embeds"):
            raise DiffquantError(
                "class-conditional UNet2DModel (class_embed_type / num_class_embeds) is not supported; only "
                "unconditional ones are"
            )
        super().__init__(model, pipe, resolution)

    def call(self, model, inputs: dict) -> torch.Tensor:
        return model(inputs["sample"], inputs["timestep"], return_dict=False)[0]

    def reference_call(self, prompts: list[str]) -> dict | None:
        return None  # DDPMPipeline samples ancestrally (fresh noise every step): nothing to match step for step

    def default_prompts(self) -> list[str]:
        return [""]  # unconditional: one "prompt", no conditioning rows
