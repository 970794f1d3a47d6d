"""PNG grids from numpy images (torch-free: `generate` uses it on edge devices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffquant._io import atomic_path

__all__ = ["png_bytes", "save_grid_array"]


def png_bytes(image: np.ndarray, text: dict | None = None) -> bytes:
    """One image in [-1, 1] shaped [C, H, W] as PNG bytes, ``text`` in its text chunks."""
    import io

    from PIL import Image

    arr = _uint8(image[None])[0]
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG", pnginfo=_png_info(text))
    return buf.getvalue()


def _uint8(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8."""
    return np.round((np.clip(images.astype(np.float32), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def _png_info(text: dict | None):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_itxt(k, str(v))
    return info


def _annotate(img, title: str, row_labels: list[str], row_px: int, top_px: int):
    """``img`` with ``title`` above it and one label left of each row (PIL's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(img)
    left = max((int(probe.textlength(t, font=font)) for t in row_labels), default=-8) + 8
    top = 6 + 14 * len(title.splitlines()) if title else 0
    white, black = (255 if img.mode == "L" else (255, 255, 255)), (0 if img.mode == "L" else (0, 0, 0))
    out = Image.new(img.mode, (img.width + left, img.height + top), white)
    out.paste(img, (left, top))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(title.splitlines()):
        draw.text((4, 3 + 14 * i), line, fill=black, font=font)
    for r, label in enumerate(row_labels):
        draw.text((3, top + top_px + r * row_px + row_px // 2 - 6), label, fill=black, font=font)
    return out


def save_grid_array(
    images: np.ndarray,
    path: str | Path,
    ncol: int = 10,
    zoom: int = 3,
    pad: int = 2,
    title: str = "",
    row_labels: list[str] | None = None,
    text: dict[str, str] | None = None,
) -> Path:
    """Save images in [-1, 1] shaped [N, C, H, W] (C = 1 or 3) as one grid PNG, ``ncol`` per row,
    with an optional ``title`` above, a label left of each row, and ``text`` as PNG text chunks
    (how the image was made: prompt, seed, steps, ...)."""
    from PIL import Image

    n, c, h, w = images.shape
    ncol = max(1, min(ncol, n))
    rows = (n + ncol - 1) // ncol
    canvas = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    arr = _uint8(images)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img = img.resize((canvas.shape[1] * zoom, canvas.shape[0] * zoom), Image.NEAREST)
    if title or row_labels:
        img = _annotate(img, title, list(row_labels or []), (h + pad) * zoom, pad * zoom)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG", pnginfo=_png_info(text))
    return Path(path)
