"""Activation observation: run calibration batches through a model and record, per layer and
per calibration timestep, the input range (and a value sample for percentile / MSE search).

Layers that read the very same tensor (Q/K/V, cross-attention K/V) are grouped: the deployed
graph has one Q/DQ per tensor, so a group gets one scale.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.calib_data import CalibSet

__all__ = ["ActStats", "observe_activations"]

SAMPLE_PER_BATCH = 4096


@dataclass
class ActStats:
    """Per-layer input statistics keyed by calibration timestep, plus the input groups."""

    amax: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))
    samples: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    groups: dict[str, str] = field(default_factory=dict)

    def reduced_amax(self, layer: str, how: str = "max") -> float:
        """Reduce the per-timestep ranges: ``max`` over timesteps or their ``mean``."""
        vals = list(self.amax[layer].values())
        return max(vals) if how == "max" else sum(vals) / len(vals)


@torch.no_grad()
def observe_activations(
    model: nn.Module, layers: list[str], calib: CalibSet, keep_samples: bool = False, batch_size: int = 256, progress: bool = True
) -> ActStats:
    """Run ``model`` (the full denoiser, whose ``.model`` holds ``layers``) over ``calib``."""
    stats = ActStats()
    modules = dict(model.model.named_modules())
    current = {"t": 0.0}
    first_inputs: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)
    handles = []

    def make_hook(name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in first_inputs:
                first_inputs[name] = x
            a = float(x.detach().abs().max())
            prev = stats.amax[name].get(current["t"], 0.0)
            stats.amax[name][current["t"]] = max(prev, a)
            if keep_samples:
                flat = x.detach().reshape(-1)
                idx = torch.randint(0, flat.numel(), (min(SAMPLE_PER_BATCH, flat.numel()),), generator=gen)
                stats.samples[name].append(flat[idx].float().clone())

        return hook

    for name in layers:
        handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
    try:
        total = sum(1 for _ in calib.batches(batch_size))
        for ts, x, t, c in tqdm(calib.batches(batch_size), total=total, desc="observe", leave=False, disable=not progress):
            current["t"] = ts
            model(x, t, c)
    finally:
        for h in handles:
            h.remove()
    # group layers whose first-batch input was the same tensor (kept alive in first_inputs)
    by_key: dict[tuple, str] = {}
    for name in layers:
        x = first_inputs.get(name)
        if x is None:
            stats.groups[name] = name
            continue
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        stats.groups[name] = by_key.setdefault(key, name)
    return stats
