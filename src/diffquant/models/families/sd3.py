"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): CLIP-L + CLIP-G (+ T5, zeros where the
pipeline ships without it, as diffusers does) joint text sequence and pooled projections;
flow matching with the scheduler's shift."""

from __future__ import annotations

import torch

from diffquant.models.families.base import Family, calculate_shift, chunked
from diffquant.models.inputs import InputSpec

__all__ = ["SD3"]


class SD3(Family):
    name = "sd3"
    classes = ("SD3Transformer2DModel",)
    sampler = "flow"
    # NVIDIA's list: patch / position embedding, time-text embedding, context embedder, adaLN, final layer
    skip = ("pos_embed.*", "time_text_embed.*", "context_embedder", "*.norm1.linear", "*.norm1_context.linear", "norm_out.*", "proj_out")
    block_types = ("JointTransformerBlock",)
    default_guidance = 7.0

    def input_specs(self) -> list[InputSpec]:
        return [
            *self.base_specs(),
            InputSpec("encoder_hidden_states", "float32", ("batch", "text_seq", self.config.joint_attention_dim)),
            InputSpec("pooled_projections", "float32", ("batch", self.config.pooled_projection_dim)),
        ]

    def call(self, model, inputs: dict) -> torch.Tensor:
        return model(
            hidden_states=inputs["hidden_states"], timestep=inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"], return_dict=False,
        )[0]

    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        def enc(ps):
            return pipe.encode_prompt(ps, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt="")

        parts = chunked(enc, prompts)
        return {
            "encoder_hidden_states": torch.cat([p[0] for p in parts] + [parts[0][1][:1]]),
            "pooled_projections": torch.cat([p[2] for p in parts] + [parts[0][3][:1]]),
        }

    def flow_kwargs(self, steps: int, scheduler: dict) -> dict:
        if not scheduler.get("use_dynamic_shifting"):
            return {}
        h, w = self.latent_hw
        seq = (h // self.patch) * (w // self.patch)
        g = scheduler.get
        return {"mu": calculate_shift(seq, g("base_image_seq_len", 256), g("max_image_seq_len", 4096), g("base_shift", 0.5), g("max_shift", 1.16))}
