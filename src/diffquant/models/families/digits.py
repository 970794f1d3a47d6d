"""The builtin digits models as two more adapters: `digits-sd` (the SD layout with its learned
class-word "text encoder") and `digits-dit` (class labels), both pixel-space 1x16x16."""

from __future__ import annotations

import torch

from diffquant.models.families.dit import DiT
from diffquant.models.families.sd import StableDiffusion

__all__ = ["DigitsDiT", "DigitsSD"]


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
