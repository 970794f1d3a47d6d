"""PixArt-α / Σ (`PixArtTransformer2DModel`): T5 embeddings with their attention mask, optional
resolution / aspect-ratio conditions (when the config uses them), learned sigma."""

from __future__ import annotations

import torch

from diffquant.models.families.base import Family, chunked
from diffquant.models.families.text import TextEncoderSpec, TextPlan
from diffquant.models.inputs import InputSpec

__all__ = ["PixArt"]


class PixArt(Family):
    name = "pixart"
    classes = ("PixArtTransformer2DModel",)
    # NVIDIA's list for PixArt: patch / position embedding, adaLN-single, caption projection, final layer
    skip = ("pos_embed.*", "adaln_single.*", "caption_projection.*", "proj_out")
    block_types = ("BasicTransformerBlock",)
    default_guidance = 4.5

    @property
    def additional(self) -> bool:
        use = self.config.get("use_additional_conditions", None)
        return bool(self.config.sample_size == 128 if use is None else use)

    @property
    def text_len(self) -> int:
        """The pipeline pads every prompt to this many T5 tokens (the length stays static in the
        graph: a dynamic one makes the exported mask handling an `If` ONNX Runtime cannot type)."""
        return 300 if "Sigma" in self.pipe_class else 120

    def input_specs(self) -> list[InputSpec]:
        specs = [
            *self.base_specs(),
            InputSpec("encoder_hidden_states", "float32", ("batch", self.text_len, self.config.caption_channels)),
            InputSpec("encoder_attention_mask", "int64", ("batch", self.text_len)),
        ]
        if self.additional:
            specs += [
                InputSpec("resolution", "float32", ("batch", 2)),
                InputSpec("aspect_ratio", "float32", ("batch", 1)),
            ]
        return specs

    def call(self, model, inputs: dict) -> torch.Tensor:
        added = {"resolution": inputs.get("resolution"), "aspect_ratio": inputs.get("aspect_ratio")}
        out = model(
            inputs["hidden_states"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
            timestep=inputs["timestep"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return self.split_learned_sigma(out)

    def text_plan(self, pipe) -> TextPlan | None:
        """T5 with its attention mask, prompts lower-cased (the pipeline's preprocessing without
        caption cleaning, which needs bs4 and ftfy and is off by default)."""
        if getattr(pipe, "text_encoder", None) is None:
            return None
        enc = TextEncoderSpec(
            "text_encoder", "tokenizer", self.text_len, ("last_hidden_state",), feed_mask=True, lowercase=True
        )
        return TextPlan(
            [enc],
            {
                "encoder_hidden_states": ["out", "text_encoder", "last_hidden_state"],
                "encoder_attention_mask": ["mask", "text_encoder"],
            },
        )

    def reference_call(self, prompts: list[str]) -> dict | None:
        return {"prompt": prompts, "use_resolution_binning": False, "max_sequence_length": self.text_len}

    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        def enc(ps):
            return pipe.encode_prompt(
                ps,
                do_classifier_free_guidance=True,
                negative_prompt="",
                device="cpu",
                max_sequence_length=self.text_len,
            )

        parts = chunked(enc, prompts)
        rows = len(prompts) + 1
        out = {
            "encoder_hidden_states": torch.cat([p[0] for p in parts] + [parts[0][2][:1]]),
            "encoder_attention_mask": torch.cat([p[1] for p in parts] + [parts[0][3][:1]]).to(torch.int64),
        }
        if self.additional:
            h, w = self.resolution
            out["resolution"] = torch.tensor([[float(h), float(w)]] * rows)
            out["aspect_ratio"] = torch.tensor([[float(h / w)]] * rows)
        return out
