"""The digits data set: scikit-learn's 8x8 handwritten digits upsampled to 16x16 in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CLASS_WORDS", "IMAGE_SIZE", "load_digits_tensor"]

IMAGE_SIZE = 16
CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits_tensor(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [1797, 1, size, size] in [-1, 1], labels [1797] int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.tensor(d.target, dtype=torch.int64)
