"""Activation observation: run calibration batches through a model and record, per layer and
per calibration timestep, the input range (and a value sample for percentile / MSE search) and
the output range (for targets that requantize layer outputs).

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
    """Per-layer input and output statistics keyed by calibration timestep, plus the input groups."""

    amax: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))
    out_amax: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))
    samples: dict[str, dict[float, list[torch.Tensor]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    groups: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def _reduce(per_t: dict[float, float], how: str, timesteps: list[float] | None) -> float:
        vals = [v for t, v in per_t.items() if timesteps is None or t in timesteps]
        return max(vals) if how == "max" else sum(vals) / len(vals)

    def reduced_amax(self, layer: str, how: str = "max", timesteps: list[float] | None = None) -> float:
        """Reduce the per-timestep input ranges (of ``timesteps``, default all): ``max`` or ``mean``."""
        return self._reduce(self.amax[layer], how, timesteps)

    def reduced_out_amax(self, layer: str, timesteps: list[float] | None = None) -> float:
        """Largest output range over ``timesteps`` (default all)."""
        return self._reduce(self.out_amax[layer], "max", timesteps)

    def values(self, layer: str, timesteps: list[float] | None = None) -> list[torch.Tensor]:
        """The kept input value samples of ``layer`` at ``timesteps`` (default all)."""
        return [v for t, vs in self.samples[layer].items() if timesteps is None or t in timesteps for v in vs]


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
                stats.samples[name][current["t"]].append(flat[idx].float().clone())

        return hook

    def make_out_hook(name: str):
        def hook(_mod: nn.Module, _args: tuple, y: torch.Tensor) -> None:
            prev = stats.out_amax[name].get(current["t"], 0.0)
            stats.out_amax[name][current["t"]] = max(prev, float(y.detach().abs().max()))

        return hook

    for name in layers:
        handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
        handles.append(modules[name].register_forward_hook(make_out_hook(name)))
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
