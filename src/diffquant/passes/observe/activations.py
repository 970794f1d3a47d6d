"""Activation observation: run calibration batches through a model and record, per layer and
per calibration timestep, the input range (and a value sample for percentile / MSE search) and
the output range (for targets that requantize layer outputs).

Layers that read the very same tensor (Q/K/V, cross-attention K/V) are grouped: the deployed
graph has one Q/DQ per tensor, so a group gets one scale. A shortcut-split layer (input is a
channel concat [h, skip]) is observed as two quantizers, ``<layer>:input`` and ``<layer>:input#1``, each
grouped with the other readers of its half (the skip tensor also feeds the next down layer).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from diffquant.calib_data import CalibSet
from diffquant.passes.context import PassContext
from diffquant.quant.modules import smooth_input

__all__ = [
    "ActStats",
    "Watch",
    "CatRecorder",
    "concat_inputs",
    "observe_activations",
    "observe_plan_inputs",
    "quantizer_keys",
    "smoothing_multipliers",
]

SAMPLE_PER_BATCH = 4096


@dataclass
class ActStats:
    """Input statistics per input-site key (``<layer>:input``) and output statistics per layer,
    keyed by calibration timestep, plus the input groups (site key -> the site leading its tensor)."""

    amax: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))
    out_amax: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))
    samples: dict[str, dict[float, list[torch.Tensor]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    sample_amax: dict[str, dict[float, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    channel_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    channel_amax_t: dict[str, dict[float, torch.Tensor]] = field(default_factory=lambda: defaultdict(dict))
    groups: dict[str, str] = field(default_factory=dict)

    def lead(self, layer: str) -> str:
        """The layer whose input site leads the tensor ``layer``'s (unsplit) input reads."""
        return self.groups[quantizer_keys(layer, 0)[0]].rpartition(":")[0]

    def min_mean_amax(self, key: str, timesteps: list[float] | None = None) -> float:
        """NVIDIA's diffusion reduction: per timestep the mean over samples of each sample's
        input range, then the minimum over timesteps."""
        per_t = [
            sum(v) / len(v) for t, v in self.sample_amax[key].items() if v and (timesteps is None or t in timesteps)
        ]
        return min(per_t)

    @staticmethod
    def _reduce(per_t: dict[float, float], how: str, timesteps: list[float] | None) -> float:
        vals = [v for t, v in per_t.items() if timesteps is None or t in timesteps]
        return max(vals) if how == "max" else sum(vals) / len(vals)

    def reduced_amax(self, layer: str, how: str = "max", timesteps: list[float] | None = None) -> float:
        """Reduce the per-timestep input ranges (of ``timesteps``, default all): ``max``, ``mean``,
        or ``min-mean`` (see `min_mean_amax`)."""
        if how == "min-mean":
            return self.min_mean_amax(layer, timesteps)
        return self._reduce(self.amax[layer], how, timesteps)

    def reduced_out_amax(self, layer: str, timesteps: list[float] | None = None) -> float:
        """Largest output range over ``timesteps`` (default all)."""
        return self._reduce(self.out_amax[layer], "max", timesteps)

    def values(self, layer: str, timesteps: list[float] | None = None) -> list[torch.Tensor]:
        """The kept input value samples of ``layer`` at ``timesteps`` (default all)."""
        return [v for t, vs in self.samples[layer].items() if timesteps is None or t in timesteps for v in vs]


class CatRecorder(TorchFunctionMode):
    """Records every channel concat (``torch.cat`` along dim 1 of two tensors) run under it:
    output id -> its pieces. The tensors are kept alive so ids stay unique."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.cat:
            seq = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if isinstance(out, torch.Tensor) and len(seq) == 2 and out.dim() >= 2 and dim in (1, 1 - out.dim()):
                self.pieces[id(out)] = (seq[0], seq[1], out)
        return out


@torch.no_grad()
def concat_inputs(model: nn.Module, layers: list[str], inputs: dict) -> dict[str, int]:
    """Layers (of ``model.model``) whose input is a two-piece channel concat, with the first
    piece's channel count: in a UNet decoder ResBlock that is the skip conv reading [h, skip]."""
    modules = dict(model.model.named_modules())
    found: dict[str, int] = {}
    rec = CatRecorder()

    def make_hook(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            p = rec.pieces.get(id(args[0]))
            if p is not None:
                found[name] = int(p[0].shape[1])

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in layers]
    try:
        with rec:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def quantizer_keys(name: str, split: int) -> list[str]:
    """Stats keys of a layer's activation quantizers: its input sites' keys (two halves for a
    shortcut split)."""
    return [f"{name}:input", f"{name}:input#1"] if split else [f"{name}:input"]


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()))


@dataclass
class Watch:
    """What `observe_activations` records besides every input's range: a value sample per batch
    for percentile / MSE search (``keep_samples``); shortcut-split layers, observed as two
    quantizers (``splits``: first-half channels); per-input-channel factors applied before
    observing (``multipliers``: equivalent scaling already decided); and the layers whose
    per-input-channel range is kept over all timesteps (SmoothQuant) and per timestep (TCR)."""

    keep_samples: bool = False
    splits: dict[str, int] = field(default_factory=dict)
    multipliers: dict[str, torch.Tensor] = field(default_factory=dict)
    channel_amax: set[str] = field(default_factory=set)


@torch.no_grad()
def observe_activations(
    model: nn.Module,
    layers: list[str],
    calib: CalibSet,
    watch: Watch | None = None,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> ActStats:
    """Run ``model`` (the full denoiser, whose ``.model`` holds ``layers``) over ``calib`` and
    record the statistics of ``layers``' inputs and outputs (see `Watch` for the extras)."""
    obs = _Observer(model, layers, watch or Watch())
    batches = calib.batches(batch_size)
    total = sum(1 for _ in calib.batches(batch_size))
    with obs.hooked():
        for i, (ts, inputs) in enumerate(tqdm(batches, total=total, desc="observe", leave=False, disable=not progress)):
            obs.t = ts
            if i == 0:  # the first batch also records concat pieces (for grouping split halves)
                with obs.cats:
                    model(**inputs)
            else:
                model(**inputs)
    obs.stats.groups = _group_inputs(layers, obs.watch.splits, obs.first_inputs)
    return obs.stats


class _Observer:
    """The hooks of one observation and what they recorded, keyed by the current timestep."""

    def __init__(self, model: nn.Module, layers: list[str], watch: Watch) -> None:
        self.layers, self.watch, self.stats = layers, watch, ActStats()
        self.modules = dict(model.model.named_modules())
        self.t = 0.0
        self.first_inputs: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(0)
        self.cats = CatRecorder()

    @contextmanager
    def hooked(self) -> Iterator[None]:
        handles = []
        for name in self.layers:
            handles.append(self.modules[name].register_forward_pre_hook(self._input_hook(name)))
            handles.append(self.modules[name].register_forward_hook(self._output_hook(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def record(self, key: str, x: torch.Tensor) -> None:
        stats, t = self.stats, self.t
        per_sample = x.detach().abs().reshape(len(x), -1).amax(dim=1)
        stats.amax[key][t] = max(stats.amax[key].get(t, 0.0), float(per_sample.max()))
        stats.sample_amax[key][t].extend(per_sample.tolist())
        if self.watch.keep_samples:
            flat = x.detach().reshape(-1)
            idx = torch.randint(0, flat.numel(), (min(SAMPLE_PER_BATCH, flat.numel()),), generator=self.gen)
            stats.samples[key][t].append(flat[idx].float().clone())

    def _channels(self, name: str, x: torch.Tensor, *, conv: bool) -> None:
        """The per-input-channel range of ``x``, over all timesteps and at this one."""
        stats, t = self.stats, self.t
        axis = 1 if conv else x.dim() - 1
        cur = x.detach().abs().amax(dim=[d for d in range(x.dim()) if d != axis]).float()
        prev = stats.channel_amax.get(name)
        stats.channel_amax[name] = cur if prev is None else torch.maximum(prev, cur)
        prev_t = stats.channel_amax_t[name].get(t)
        stats.channel_amax_t[name][t] = cur if prev_t is None else torch.maximum(prev_t, cur)

    def _input_hook(self, name: str):
        conv, watch = isinstance(self.modules[name], nn.Conv2d), self.watch

        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if name in watch.multipliers:
                x = smooth_input(x, watch.multipliers[name], conv=conv)
            if name in watch.channel_amax:
                self._channels(name, x, conv=conv)
            split = watch.splits.get(name, 0)
            if not split:
                key = quantizer_keys(name, 0)[0]
                self.first_inputs.setdefault(key, args[0])
                self.record(key, x)
                return
            pieces = self.cats.pieces.get(id(args[0]))
            halves = (x[:, :split], x[:, split:])
            for i, key in enumerate(quantizer_keys(name, split)):
                self.first_inputs.setdefault(key, pieces[i] if pieces is not None else halves[i])
                self.record(key, halves[i])

        return hook

    def _output_hook(self, name: str):
        def hook(_mod: nn.Module, _args: tuple, y: torch.Tensor) -> None:
            prev = self.stats.out_amax[name].get(self.t, 0.0)
            self.stats.out_amax[name][self.t] = max(prev, float(y.detach().abs().max()))

        return hook


def _group_inputs(layers: list[str], splits: dict[str, int], first_inputs: dict[str, torch.Tensor]) -> dict[str, str]:
    """Quantizer key -> the key leading its group: quantizers whose first-batch input was the
    same tensor (kept alive in first_inputs), or an equal one computed twice by the same ops
    (each ResBlock applies SiLU to the one time embedding; the exported graph computes it once,
    so its readers share one Q/DQ)."""
    by_key: dict[tuple, str] = {}
    by_value: dict[tuple, list[str]] = {}
    groups: dict[str, str] = {}
    for name in layers:
        for key in quantizer_keys(name, splits.get(name, 0)):
            x = first_inputs.get(key)
            if x is None:
                groups[key] = key
                continue
            lead = by_key.setdefault(_tensor_key(x), key)
            if lead == key:  # a new tensor: is it equal to one seen before?
                cands = by_value.setdefault((tuple(x.shape), float(x.detach().float().sum())), [])
                lead = next((c for c in cands if torch.equal(first_inputs[c], x)), key)
                if lead == key:
                    cands.append(key)
            groups[key] = groups.get(lead, lead)
    return groups


def smoothing_multipliers(plan) -> dict[str, torch.Tensor]:
    """Per-input-channel multipliers already decided (equivalent scaling), by layer."""
    return {
        lp.name: s.multiplier
        for lp in plan.quantized_layers()
        if (s := lp.sites.get("input")) is not None and s.multiplier is not None
    }


def observe_plan_inputs(ctx: PassContext, *, keep_samples: bool = False, batch_size: int = 256) -> ActStats:
    """Observe the inputs of the plan's activation-quantized layers, as the plan will see them
    (shortcut splits as two quantizers, equivalent scaling applied)."""
    layers = [lp.name for lp in ctx.plan.quantized_layers() if lp.act]
    splits = {lp.name: lp.split for lp in ctx.plan.quantized_layers() if lp.act and lp.split}
    watch = Watch(keep_samples=keep_samples, splits=splits, multipliers=smoothing_multipliers(ctx.plan))
    return observe_activations(ctx.denoiser, layers, ctx.calib, watch, batch_size=batch_size, progress=ctx.progress)
