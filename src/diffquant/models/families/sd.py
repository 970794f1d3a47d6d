"""Stable Diffusion 1.x / 2.x: `UNet2DConditionModel` with CLIP text embeddings (v-prediction
models come with their scheduler config), and the UNet defaults shared by SDXL."""

from __future__ import annotations

import torch

from diffquant.models.families.base import Family, chunked
from diffquant.models.families.text import TextEncoderSpec, TextPlan
from diffquant.models.inputs import InputSpec

__all__ = ["UNET_BLOCKS", "UNET_SKIP", "StableDiffusion"]

# first and last layers, time embedding and every time_emb_proj, added (SDXL) embeddings
UNET_SKIP = ("conv_in", "conv_out", "time_embedding.*", "*time_emb_proj", "add_embedding.*")
UNET_BLOCKS = ("ResnetBlock2D", "Transformer2DModel")


class StableDiffusion(Family):
    name = "sd"
    classes = ("UNet2DConditionModel",)
    sample_name = "sample"
    skip = UNET_SKIP
    block_types = UNET_BLOCKS
    default_guidance = 7.5

    @property
    def text_dim(self) -> int:
        dim = self.config.get("encoder_hid_dim", None) or self.config.cross_attention_dim
        return dim if isinstance(dim, int) else dim[0]

    def input_specs(self) -> list[InputSpec]:
        return [*self.base_specs(), InputSpec("encoder_hidden_states", "float32", ("batch", "text_seq", self.text_dim))]

    def added_cond(self, inputs: dict) -> dict | None:
        return None

    def call(self, model, inputs: dict) -> torch.Tensor:
        extra = {} if (added := self.added_cond(inputs)) is None else {"added_cond_kwargs": added}
        return model(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            return_dict=False,
            **extra,
        )[0]

    def text_plan(self, pipe) -> TextPlan | None:
        if getattr(pipe, "text_encoder", None) is None:
            return None
        mask = bool(getattr(pipe.text_encoder.config, "use_attention_mask", False))
        enc = TextEncoderSpec(
            "text_encoder", "tokenizer", pipe.tokenizer.model_max_length, ("last_hidden_state",), feed_mask=mask
        )
        return TextPlan([enc], {"encoder_hidden_states": ["out", "text_encoder", "last_hidden_state"]})

    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        def enc(ps):
            return pipe.encode_prompt(ps, "cpu", 1, do_classifier_free_guidance=True, negative_prompt=None)

        parts = chunked(enc, prompts)
        return {"encoder_hidden_states": torch.cat([p[0] for p in parts] + [parts[0][1][:1]])}
