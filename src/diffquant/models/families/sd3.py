"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): CLIP-L + CLIP-G (+ T5, zeros where the
pipeline ships without it, as diffusers does) joint text sequence and pooled projections;
flow matching with the scheduler's shift."""

from __future__ import annotations

import torch

from diffquant.models.families.base import Family, calculate_shift, chunked
from diffquant.models.families.text import TextEncoderSpec, TextPlan
from diffquant.models.inputs import InputSpec

__all__ = ["SD3"]


class SD3(Family):
    name = "sd3"
    classes = ("SD3Transformer2DModel",)
    sampler = "flow"
    # NVIDIA's list: patch / position embedding, time-text embedding, context embedder, adaLN, final layer
    skip = (
        "pos_embed.*",
        "time_text_embed.*",
        "context_embedder",
        "*.norm1.linear",
        "*.norm1_context.linear",
        "norm_out.*",
        "proj_out",
    )
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
            hidden_states=inputs["hidden_states"],
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            return_dict=False,
        )[0]

    T5_LENGTH = 256  # the pipeline's default max_sequence_length

    def text_plan(self, pipe) -> TextPlan | None:
        """Both CLIPs' penultimate states side by side, zero-padded to the T5 width and followed
        by the T5 sequence (zeros of 77 tokens where the pipeline ships without T5); pooled: both
        CLIPs' projections side by side."""
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "text_encoder_2", None) is None:
            return None
        clip_len = pipe.tokenizer.model_max_length
        encs = [
            TextEncoderSpec(n, t, clip_len, ("penultimate", "pooled"))
            for n, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        ]
        dim = self.config.joint_attention_dim
        t5: list = ["zeros", [clip_len, dim]]
        if getattr(pipe, "text_encoder_3", None) is not None:
            encs.append(TextEncoderSpec("text_encoder_3", "tokenizer_3", self.T5_LENGTH, ("last_hidden_state",)))
            t5 = ["out", "text_encoder_3", "last_hidden_state"]
        clip = [
            "pad",
            dim,
            ["cat", -1, ["out", "text_encoder", "penultimate"], ["out", "text_encoder_2", "penultimate"]],
        ]
        return TextPlan(
            encs,
            {
                "encoder_hidden_states": ["cat", -2, clip, t5],
                "pooled_projections": [
                    "cat",
                    -1,
                    ["out", "text_encoder", "pooled"],
                    ["out", "text_encoder_2", "pooled"],
                ],
            },
        )

    def reference_call(self, prompts: list[str]) -> dict | None:
        return {"prompt": prompts, "max_sequence_length": self.T5_LENGTH}

    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        def enc(ps):
            return pipe.encode_prompt(
                ps,
                None,
                None,
                device="cpu",
                do_classifier_free_guidance=True,
                negative_prompt="",
                max_sequence_length=self.T5_LENGTH,
            )

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
        return {
            "mu": calculate_shift(
                seq,
                g("base_image_seq_len", 256),
                g("max_image_seq_len", 4096),
                g("base_shift", 0.5),
                g("max_shift", 1.16),
            )
        }
