"""Named denoiser inputs: one mapping that travels through calibration, passes, export, parity
and the runtime instead of a hard-coded ``(sample, timestep, cond)`` call."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ROLES", "InputSpec", "NamedInputs"]

# sample: the latent the sampler updates; timestep: filled per step; cond: a row of the prompt
# table (text embeddings, pooled embeddings, masks, time ids, class labels); guidance: the
# guidance scale of guidance-distilled models; static: constants shared by every sample (no batch)
ROLES = ("sample", "timestep", "cond", "guidance", "static")


@dataclass(frozen=True)
class InputSpec:
    """A denoiser input: name, numpy dtype name, shape (strings are dynamic axes: "batch", and
    "text_seq" where the model takes any prompt length), and its role (see ``ROLES``)."""

    name: str
    dtype: str
    shape: tuple
    role: str = "cond"

    @property
    def batched(self) -> bool:
        return bool(self.shape) and self.shape[0] == "batch"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "role": self.role}


class NamedInputs(dict):
    """Input name -> tensor. Names in ``batched`` carry the batch on dim 0; the others (static
    inputs such as Flux's position ids) are shared by every sample and never sliced."""

    def __init__(self, data: dict, batched: Iterable[str]) -> None:
        super().__init__(data)
        self.batched = frozenset(batched)

    @property
    def size(self) -> int:
        """The batch size (rows of the batched inputs)."""
        return next(len(v) for k, v in self.items() if k in self.batched)

    def take(self, idx) -> NamedInputs:
        """Rows ``idx`` (a slice or an index tensor) of every batched input."""
        return NamedInputs({k: (v[idx] if k in self.batched else v) for k, v in self.items()}, self.batched)

    @staticmethod
    def cat(parts: list[NamedInputs]) -> NamedInputs:
        """Concatenate batches (static inputs are taken from the first)."""
        first = parts[0]
        return NamedInputs(
            {k: (torch.cat([p[k] for p in parts]) if k in first.batched else v) for k, v in first.items()},
            first.batched,
        )

    def clone(self) -> NamedInputs:
        return NamedInputs({k: v.clone() for k, v in self.items()}, self.batched)

    def to(self, device) -> NamedInputs:
        return NamedInputs({k: v.to(device) for k, v in self.items()}, self.batched)

    def numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.items()}
