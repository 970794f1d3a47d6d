"""SDXL (base and refiner): a `UNet2DConditionModel` with ``addition_embed_type: text_time``,
two CLIP encoders (penultimate hidden states concatenated, pooled projection as
``text_embeds``) and micro-conditioning ``time_ids`` (6 values; 5 with the refiner's
aesthetic score)."""

from __future__ import annotations

import torch

from diffquant.errors import DiffquantError
from diffquant.models.families.base import chunked
from diffquant.models.families.sd import StableDiffusion
from diffquant.models.families.text import TextEncoderSpec, TextPlan
from diffquant.models.inputs import InputSpec

__all__ = ["StableDiffusionXL"]


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    default_guidance = 5.0

    def __init__(self, model, pipe=None, resolution=None) -> None:
        super().__init__(model, pipe, resolution)
        c = self.config
        # the pipeline says whether it is a refiner (aesthetic score: 5 time ids) and how wide
        # the pooled projection is; the UNet's added-embedding width must agree
        refiner = bool(getattr(getattr(pipe, "config", None), "requires_aesthetics_score", False))
        self.n_time_ids = 5 if refiner else 6
        encoder = getattr(pipe, "text_encoder_2", None)
        pooled = c.projection_class_embeddings_input_dim - self.n_time_ids * c.addition_time_embed_dim
        if encoder is not None and encoder.config.projection_dim != pooled:
            raise DiffquantError(
                f"SDXL UNet config: projection_class_embeddings_input_dim {c.projection_class_embeddings_input_dim} != "
                f"{self.n_time_ids} time ids x {c.addition_time_embed_dim} + text_encoder_2 projection_dim "
                f"{encoder.config.projection_dim}"
            )
        self.pooled_dim = int(pooled)

    def input_specs(self) -> list[InputSpec]:
        return [
            *super().input_specs(),
            InputSpec("text_embeds", "float32", ("batch", self.pooled_dim)),
            InputSpec("time_ids", "float32", ("batch", self.n_time_ids)),
        ]

    def added_cond(self, inputs: dict) -> dict:
        return {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}

    def time_ids(self, *, negative: bool) -> list[float]:
        h, w = self.resolution
        if self.n_time_ids == 6:
            return [h, w, 0, 0, h, w]
        return [h, w, 0, 0, 2.5 if negative else 6.0]  # refiner: original size, crop, aesthetic score

    def text_plan(self, pipe) -> TextPlan | None:
        """Penultimate hidden states of both CLIPs side by side (the refiner has only the second),
        the second's projected pooled output; no negative prompt means zeros where the pipeline
        forces them (``force_zeros_for_empty_prompt``)."""
        if getattr(pipe, "text_encoder_2", None) is None:
            return None
        names = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
        encs = [
            TextEncoderSpec(
                n,
                n.replace("text_encoder", "tokenizer"),
                getattr(pipe, n.replace("text_encoder", "tokenizer")).model_max_length,
                ("penultimate", "pooled") if n == "text_encoder_2" else ("penultimate",),
            )
            for n in names
        ]
        hidden = [["out", n, "penultimate"] for n in names]
        compose = {
            "encoder_hidden_states": ["cat", -1, *hidden] if len(hidden) > 1 else hidden[0],
            "text_embeds": ["out", "text_encoder_2", "pooled"],
        }
        zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
        return TextPlan(encs, compose, "zeros" if zeros else "empty")

    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        def enc(ps):
            return pipe.encode_prompt(ps, None, "cpu", 1, do_classifier_free_guidance=True, negative_prompt=None)

        parts = chunked(enc, prompts)
        n = len(prompts)
        ids = torch.tensor([self.time_ids(negative=False)] * n + [self.time_ids(negative=True)], dtype=torch.float32)
        return {
            "encoder_hidden_states": torch.cat([p[0] for p in parts] + [parts[0][1][:1]]),
            "text_embeds": torch.cat([p[2] for p in parts] + [parts[0][3][:1]]),
            "time_ids": ids,
        }
