"""Small PNG charts drawn with PIL (no plotting library): horizontal bars, a scatter, a strip of
coloured cells. Enough for the reports to show what their tables say."""

from __future__ import annotations

from pathlib import Path

from diffquant._io import atomic_path

__all__ = ["PALETTE", "bar_chart", "scatter", "strip"]

PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]
ROW = 14


def _canvas(width: int, height: int, title: str):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((6, 4), title, fill=(0, 0, 0), font=font)
    return img, draw, font


def _save(img, path: str | Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def bar_chart(
    labels: list[str],
    values: list[float],
    path: str | Path,
    title: str,
    unit: str = "",
    colors: list[int] | None = None,
) -> Path:
    """One horizontal bar per label (values >= 0 drawn from the left edge), the value printed after it;
    ``colors`` indexes `PALETTE` per bar."""
    img, draw, font = _canvas(1, 1, "")
    left = max((int(draw.textlength(t, font=font)) for t in labels), default=0) + 12
    width, bar_w = left + 420, 300
    img, draw, font = _canvas(width, 28 + ROW * len(labels) + 8, title)
    top = max(values, default=0.0) or 1.0
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 26 + ROW * i
        draw.text((6, y), label, fill=(0, 0, 0), font=font)
        w = int(bar_w * max(v, 0.0) / top)
        color = PALETTE[(colors[i] if colors else 0) % len(PALETTE)]
        draw.rectangle([left, y + 2, left + max(w, 1), y + ROW - 3], fill=color)
        draw.text((left + w + 6, y), f"{v:.3g}{unit}", fill=(0, 0, 0), font=font)
    return _save(img, path)


def scatter(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    size: int = 360,
) -> Path:
    """Points (x, y) per named series on shared axes, with the y = x diagonal and a legend."""
    pts = [p for s in series.values() for p in s]
    lo = min((min(p) for p in pts), default=0.0)
    hi = max((max(p) for p in pts), default=1.0)
    hi = hi if hi > lo else lo + 1.0
    pad, top = 50, 40
    img, draw, font = _canvas(size + pad + 20, size + top + 50 + ROW * len(series), title)

    def xy(p: tuple[float, float]) -> tuple[int, int]:
        return pad + int(size * (p[0] - lo) / (hi - lo)), top + size - int(size * (p[1] - lo) / (hi - lo))

    draw.rectangle([pad, top, pad + size, top + size], outline=(0, 0, 0))
    draw.line([xy((lo, lo)), xy((hi, hi))], fill=(180, 180, 180))
    for k, (name, s) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        for p in s:
            x, y = xy(p)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.rectangle([pad, top + size + 36 + ROW * k, pad + 8, top + size + 44 + ROW * k], fill=color)
        draw.text((pad + 14, top + size + 33 + ROW * k), name, fill=(0, 0, 0), font=font)
    draw.text((pad, top + size + 4), f"{xlabel}  ({lo:.3g} .. {hi:.3g})", fill=(0, 0, 0), font=font)
    draw.text((4, top - 14), ylabel, fill=(0, 0, 0), font=font)
    return _save(img, path)


def strip(
    cells: list[int], legend: list[str], path: str | Path, title: str, marks: list[tuple[int, str]] | None = None
) -> Path:
    """A row of coloured cells (``cells`` index ``legend`` / `PALETTE`), optional text marks
    (cell index, label) under it on three staggered lines, and the legend."""
    cell = max(4, min(24, 960 // max(1, len(cells))))
    width = max(len(cells) * cell + 160, 420)
    top = 112
    img, draw, font = _canvas(width, top + ROW * len(legend) + 6, title)
    for i, c in enumerate(cells):
        draw.rectangle(
            [10 + i * cell, 26, 10 + (i + 1) * cell - 1, 56], fill=PALETTE[c % len(PALETTE)], outline=(255, 255, 255)
        )
    for k, (i, label) in enumerate(marks or []):
        y = 62 + ROW * (k % 3)
        draw.line([10 + i * cell, 57, 10 + i * cell, y + 4], fill=(0, 0, 0))
        draw.text((10 + i * cell + 3, y), label, fill=(0, 0, 0), font=font)
    for k, name in enumerate(legend):
        draw.rectangle([10, top + ROW * k, 20, top + 10 + ROW * k], fill=PALETTE[k % len(PALETTE)])
        draw.text((26, top - 2 + ROW * k), name, fill=(0, 0, 0), font=font)
    return _save(img, path)
