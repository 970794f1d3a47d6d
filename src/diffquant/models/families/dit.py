"""DiT (`DiTTransformer2DModel`): class labels with a null class for CFG; learned-sigma models
(``out_channels == 2 * in_channels``, the DiT-XL layout) have their variance half dropped."""

from __future__ import annotations

import torch

from diffquant.errors import DiffquantError
from diffquant.models.families.base import Family
from diffquant.models.inputs import InputSpec

__all__ = ["DIT_SKIP", "DiT"]

# patch embedding, adaLN modulation (and its timestep / class embedding) and the final projections
DIT_SKIP = ("pos_embed.*", "*.norm1.emb.*", "*.norm1.linear", "proj_out_1", "proj_out_2")


class DiT(Family):
    name = "dit"
    classes = ("DiTTransformer2DModel",)
    skip = DIT_SKIP
    block_types = ("BasicTransformerBlock",)
    default_guidance = 4.0

    def input_specs(self) -> list[InputSpec]:
        return [*self.base_specs(), InputSpec("class_labels", "int64", ("batch",))]

    def call(self, model, inputs: dict) -> torch.Tensor:
        out = model(
            inputs["hidden_states"], timestep=inputs["timestep"], class_labels=inputs["class_labels"], return_dict=False
        )[0]
        return self.split_learned_sigma(out)

    @property
    def n_classes(self) -> int:
        return int(self.config.num_embeds_ada_norm)

    def default_prompts(self) -> list[str]:
        n = self.n_classes
        return [str(round(i * (n - 1) / 31)) for i in range(32)] if n > 32 else [str(i) for i in range(n)]

    def reference_call(self, prompts: list[str]) -> dict | None:
        return {"class_labels": [int(p) for p in prompts]}

    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        labels = dict(getattr(pipe, "labels", None) or {}) if pipe is not None else {}
        ids = []
        for p in prompts:
            key = p.strip()
            if key.isdigit() and int(key) < self.n_classes:
                ids.append(int(key))
            elif key in labels:
                ids.append(int(labels[key]))
            else:
                raise DiffquantError(
                    f"{p!r} is not a class of this DiT: give class indices 0..{self.n_classes - 1}"
                    + (" or ImageNet label names" if labels else "")
                )
        return {"class_labels": torch.tensor([*ids, self.n_classes], dtype=torch.int64)}  # the null class last
