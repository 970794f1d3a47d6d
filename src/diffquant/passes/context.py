"""What a pass sees: the FP denoiser, the plan being decided, and the calibration data. Passes
talk to each other only through the plan (its sites, weights and reports)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.calib_data import CalibSet
from diffquant.models.denoiser import Denoiser
from diffquant.quant.plan import QuantPlan

__all__ = ["PassContext"]


@dataclass
class PassContext:
    denoiser: Denoiser
    plan: QuantPlan
    calib: CalibSet
    progress: bool = True

    def weight(self, layer: str) -> torch.Tensor:
        """The FP weight the plan quantizes: a replacement from an earlier pass (equivalent
        scaling folded in, rounded weights), else the model's own."""
        w = self.plan.weights.get(layer)
        return w if w is not None else self.denoiser.model.get_submodule(layer).weight.detach()
