"""Random-weight pipelines of a realistic size for the CPU runtime benchmark, built from configs
(nothing downloaded, nothing shipped): an SD-1.5-layout UNet at a 128 base width and a DiT-B/2,
both on 4-channel 32x32 latents, of similar cost per step.

    python benchmarks/realistic.py --out /tmp/realistic   # writes sd-unet/ and dit-b2/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pipelines import _clip, _clip_tokenizer, _ddim, _randomize_zero_init, _vae  # noqa: E402

__all__ = ["MODELS", "make_realistic"]

MODELS = ("sd-unet", "dit-b2")


def _build(kind: str, tmp: Path):
    import diffusers as d

    torch.manual_seed(0)
    if kind == "sd-unet":  # SD 1.5's block layout and attention, 128/256/512/512 channels
        unet = d.UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ).eval()
        return d.StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_clip(hidden=768, proj=768),
            tokenizer=_clip_tokenizer(tmp / "tok"),
            unet=unet,
            scheduler=_ddim(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if kind == "dit-b2":  # DiT-B/2: 12 blocks of width 768, patch 2 (256 tokens at 32x32)
        tr = d.DiTTransformer2DModel(
            num_attention_heads=12,
            attention_head_dim=64,
            in_channels=4,
            out_channels=8,
            num_layers=12,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_num_groups=32,
        )
        _randomize_zero_init(tr)
        return d.DiTPipeline(
            transformer=tr.eval(), vae=_vae(), scheduler=_ddim(), id2label={i: f"class{i}" for i in range(8)}
        )
    raise ValueError(f"unknown model {kind!r}; one of {MODELS}")


def make_realistic(kind: str, folder: str | Path) -> Path:
    """Build ``kind`` and `save_pretrained` it into ``folder`` (reused when it is already there)."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    pipe = _build(kind, folder.parent / f".{folder.name}-tok")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    for m in MODELS:
        print(make_realistic(m, Path(a.out) / m))
