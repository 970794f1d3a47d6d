"""The builtin digits models as adapters: `digits-sd` (the SD layout with its learned class-word
"text encoder") and `digits-dit` (class labels), both pixel-space 1x16x16, and `digits-ldm` (a
real Stable Diffusion pipeline: CLIP text encoder, VAE, 32x32 images from 4x8x8 latents)."""

from __future__ import annotations

import torch

from diffquant.models.families.dit import DiT
from diffquant.models.families.sd import StableDiffusion

__all__ = ["DigitsDiT", "DigitsLDM", "DigitsSD"]


class DigitsSD(StableDiffusion):
    name = "digits-sd"
    default_guidance = 3.0
    feature_model = True
    prompt_separator = ","

    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        # ``pipe`` is the PromptTable: one learned row per class word, the empty prompt last
        with torch.no_grad():
            return {"encoder_hidden_states": pipe(torch.arange(len(prompts) + 1)).detach().clone()}


class DigitsDiT(DiT):
    name = "digits-dit"
    default_guidance = 3.0
    feature_model = True
    prompt_separator = ","


class DigitsLDM(StableDiffusion):
    """digits-ldm: the SD-1.x adapter, scored by the digits classifier; its prompts are one per
    class in class order (prompt id = class)."""

    name = "digits-ldm"
    default_guidance = 3.0
    feature_model = True
