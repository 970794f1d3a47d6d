"""PNG grids from numpy images (torch-free: `generate` uses it on edge devices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffquant._io import atomic_path

__all__ = ["save_grid_array"]


def save_grid_array(images: np.ndarray, path: str | Path, ncol: int = 10, zoom: int = 3, pad: int = 2) -> Path:
    """Save images in [-1, 1] shaped [N, C, H, W] (C = 1 or 3) as one grid PNG, ``ncol`` per row."""
    from PIL import Image

    n, c, h, w = images.shape
    ncol = max(1, min(ncol, n))
    rows = (n + ncol - 1) // ncol
    canvas = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    arr = np.round((np.clip(images.astype(np.float32), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img = img.resize((canvas.shape[1] * zoom, canvas.shape[0] * zoom), Image.NEAREST)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
