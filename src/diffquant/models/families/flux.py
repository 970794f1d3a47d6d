"""Flux (`FluxTransformer2DModel`): 2x2-packed latent tokens, CLIP pooled + T5 embeddings,
position ids as static inputs, the guidance scale as an input of guidance-distilled models
(dev; schnell has none), timestep fed as t / 1000, flow matching with dynamic shift."""

from __future__ import annotations

import numpy as np
import torch

from diffquant.models.families.base import Family, calculate_shift, chunked
from diffquant.models.families.text import TextEncoderSpec, TextPlan
from diffquant.models.inputs import InputSpec

__all__ = ["Flux"]


class Flux(Family):
    name = "flux"
    classes = ("FluxTransformer2DModel",)
    sampler = "flow"
    # NVIDIA's list: embedders, adaLN modulation of double and single blocks, final layer
    skip = (
        "x_embedder",
        "context_embedder",
        "time_text_embed.*",
        "*.norm1.linear",
        "*.norm1_context.linear",
        "*.norm.linear",
        "norm_out.*",
        "proj_out",
    )
    block_types = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    default_guidance = 3.5
    patch = 2

    def __init__(self, model, pipe=None, resolution=None) -> None:
        self.guidance = "embedded" if model.config.guidance_embeds else "none"
        super().__init__(model, pipe, resolution)

    def default_resolution(self) -> tuple[int, int]:
        return (128 * self.vae_scale, 128 * self.vae_scale)  # FluxPipeline.default_sample_size

    @property
    def tokens_hw(self) -> tuple[int, int]:
        h, w = self.latent_hw
        return (h // 2, w // 2)

    def sample_shape(self) -> tuple[int, ...]:
        h, w = self.tokens_hw
        return (h * w, self.config.in_channels)

    def image_latents(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), c = self.tokens_hw, self.config.in_channels
        # -1, not len(x): the exported VAE-decoder graph keeps a dynamic batch
        return x.reshape(-1, h, w, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, c // 4, h * 2, w * 2)

    def input_specs(self) -> list[InputSpec]:
        c = self.config
        specs = self.base_specs()
        if self.guidance == "embedded":
            specs.append(InputSpec("guidance", "float32", ("batch",), "guidance"))
        return specs + [
            InputSpec("pooled_projections", "float32", ("batch", c.pooled_projection_dim)),
            InputSpec("encoder_hidden_states", "float32", ("batch", "text_seq", c.joint_attention_dim)),
            InputSpec("txt_ids", "float32", ("text_seq", 3), "static"),
            InputSpec("img_ids", "float32", (self.sample_shape()[0], 3), "static"),
        ]

    def call(self, model, inputs: dict) -> torch.Tensor:
        return model(
            hidden_states=inputs["hidden_states"],
            timestep=inputs["timestep"],
            guidance=inputs.get("guidance"),
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            txt_ids=inputs["txt_ids"],
            img_ids=inputs["img_ids"],
            return_dict=False,
        )[0]

    T5_LENGTH = 512  # the length `encode` pads to (the pipeline's default)

    def text_plan(self, pipe) -> TextPlan | None:
        """CLIP's pooled output and the T5 sequence."""
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "text_encoder_2", None) is None:
            return None
        encs = [
            TextEncoderSpec("text_encoder", "tokenizer", pipe.tokenizer.model_max_length, ("pooled",)),
            TextEncoderSpec("text_encoder_2", "tokenizer_2", self.T5_LENGTH, ("last_hidden_state",)),
        ]
        return TextPlan(
            encs,
            {
                "pooled_projections": ["out", "text_encoder", "pooled"],
                "encoder_hidden_states": ["out", "text_encoder_2", "last_hidden_state"],
            },
        )

    def reference_call(self, prompts: list[str]) -> dict | None:
        return {"prompt": prompts, "max_sequence_length": self.T5_LENGTH}

    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        def enc(ps):
            return pipe.encode_prompt(ps, None, device="cpu", max_sequence_length=self.T5_LENGTH)

        parts = chunked(enc, [*prompts, ""])  # the empty prompt last (only used with --guidance and true CFG)
        return {
            "encoder_hidden_states": torch.cat([p[0] for p in parts]),
            "pooled_projections": torch.cat([p[1] for p in parts]),
        }

    def static_inputs(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h, w = self.tokens_hw
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return {"txt_ids": torch.zeros(cond["encoder_hidden_states"].shape[1], 3), "img_ids": ids.reshape(h * w, 3)}

    def model_timestep(self, t: float) -> float:
        return float(t) / 1000.0

    def flow_kwargs(self, steps: int, scheduler: dict) -> dict:
        g = scheduler.get
        seq = self.sample_shape()[0]
        mu = calculate_shift(
            seq, g("base_image_seq_len", 256), g("max_image_seq_len", 4096), g("base_shift", 0.5), g("max_shift", 1.15)
        )
        return {"sigmas": np.linspace(1.0, 1 / steps, steps).tolist(), "mu": mu}
