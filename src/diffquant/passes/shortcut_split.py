"""The `shortcut_split` pass (Q-Diffusion): a layer whose input is the decoder's channel concat
[h, skip] gets one activation quantizer per half, because the two halves come from different
places (the upsampled decoder path and the encoder skip) and their ranges differ by a lot.

Found structurally: one forward pass records every two-piece channel ``torch.cat`` and which
quantized layer reads its output directly (in a diffusers UNet: the decoder ResBlocks' 1x1
``conv_shortcut``; ``conv1`` reads the concat only after GroupNorm and SiLU).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from diffquant.passes.context import PassContext
from diffquant.passes.observe.activations import concat_inputs
from diffquant.passes.registry import register_pass

__all__ = ["ShortcutSplitConfig", "shortcut_split_pass"]


@dataclass
class ShortcutSplitConfig:
    """``patterns``: which concat-reading layers to split (fnmatch on layer names)."""

    version: int = 1
    patterns: list[str] = field(default_factory=lambda: ["*"])


@register_pass("shortcut_split", ShortcutSplitConfig)
def shortcut_split_pass(ctx: PassContext, cfg: ShortcutSplitConfig) -> None:
    """Mark every activation-quantized layer that reads a [h, skip] concat as split."""
    layers = [lp.name for lp in ctx.plan.quantized_layers() if lp.act]
    ts = ctx.calib.timesteps[0]
    found = concat_inputs(ctx.denoiser, layers, ctx.calib.at(ts, 2))
    for name, split in found.items():
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.patterns):
            lp = ctx.plan.layers[name]
            lp.set_split(split)
            lp.notes.append(f"shortcut split: input channels [:{split}] and [{split}:] quantized separately")
