"""Family adapters, chosen by the denoiser's class (and the pipeline's, for SDXL)."""

from __future__ import annotations

from diffquant.errors import DiffquantError
from diffquant.models.families.base import Family
from diffquant.models.families.digits import DigitsDiT, DigitsLDM, DigitsSD
from diffquant.models.families.dit import DiT
from diffquant.models.families.flux import Flux
from diffquant.models.families.pixart import PixArt
from diffquant.models.families.sd import StableDiffusion
from diffquant.models.families.sd3 import SD3
from diffquant.models.families.sdxl import StableDiffusionXL
from diffquant.models.families.unet2d import UnconditionalUNet

__all__ = ["FAMILIES", "DigitsDiT", "DigitsLDM", "DigitsSD", "Family", "family_for", "supported_classes"]

FAMILIES: tuple[type[Family], ...] = (StableDiffusion, StableDiffusionXL, UnconditionalUNet, DiT, PixArt, SD3, Flux)


def supported_classes() -> list[str]:
    return sorted({c for f in FAMILIES for c in f.classes})


def family_for(model, pipe=None, resolution=None) -> Family:
    """The adapter of ``model`` (a diffusers denoiser), configured from its pipeline if given."""
    cls = type(model).__name__
    if cls == "UNet2DConditionModel":
        added = model.config.get("addition_embed_type", None)
        if added == "text_time":
            return StableDiffusionXL(model, pipe, resolution)
        if added is not None or model.config.get("class_embed_type", None):
            raise DiffquantError(
                f"UNet2DConditionModel with addition_embed_type {added!r} / class_embed_type is not supported (SD "
                "1.x/2.x and SDXL are)"
            )
        return StableDiffusion(model, pipe, resolution)
    for fam in FAMILIES:
        if cls in fam.classes:
            return fam(model, pipe, resolution)
    raise DiffquantError(f"denoiser class {cls!r} is not supported; supported: {', '.join(supported_classes())}")
