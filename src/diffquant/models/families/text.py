"""How a family turns prompts into conditioning, written as data so that a torch-free runtime can
repeat it: the text encoders it runs (tokenizer, padded length, mask, outputs) and one small
expression per conditioning input that combines their outputs (concatenate, pad, take).

Expressions (JSON lists, evaluated by `engines.text.compose`):
``["out", ENCODER, OUTPUT]``, ``["mask", ENCODER]`` (the tokenizer's attention mask),
``["cat", AXIS, EXPR, ...]``, ``["pad", WIDTH, EXPR]`` (zeros on the last axis up to WIDTH; a
wider input is cropped, as torch's pad with a negative width does),
``["zeros", [SEQ, DIM]]`` (a missing encoder's stand-in, as the pipeline makes it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["OUTPUTS", "TextEncoderSpec", "TextPlan"]

# what a text-encoder graph can return: the last hidden states, the penultimate hidden states
# (CLIP skip 1, as SDXL and SD3 use them), and the pooled output (CLIP's EOS token, projected by
# CLIPTextModelWithProjection)
OUTPUTS = ("last_hidden_state", "penultimate", "pooled")


@dataclass
class TextEncoderSpec:
    """One text encoder as the pipeline runs it: the pipeline components (``text_encoder_2``,
    ``tokenizer_2``), the length every prompt is padded or truncated to, whether the tokenizer's
    attention mask is fed to the encoder, whether prompts are lower-cased first (PixArt), and
    the outputs the composition reads."""

    component: str
    tokenizer: str
    max_length: int
    outputs: tuple[str, ...]
    feed_mask: bool = False
    lowercase: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "outputs": list(self.outputs)}


@dataclass
class TextPlan:
    """The text side of a pipeline: its encoders, one expression per conditioning input built
    from text, and what the unconditional row is when no negative prompt is given (``zeros``:
    SDXL's ``force_zeros_for_empty_prompt``; ``empty``: the empty prompt encoded)."""

    encoders: list[TextEncoderSpec]
    compose: dict[str, list]
    unset_negative: str = "empty"

    def to_dict(self) -> dict:
        return {
            "encoders": [e.to_dict() for e in self.encoders],
            "compose": self.compose,
            "unset_negative": self.unset_negative,
        }
