"""A short hash of a model's weights, shared by rooms that key things on model identity
(calibration cache, plans) without importing each other."""

from __future__ import annotations

import hashlib

from torch import nn

__all__ = ["weights_digest"]


def weights_digest(model: nn.Module) -> str:
    """A short hash of a model's floating-point weights, so a plan refuses a different model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
