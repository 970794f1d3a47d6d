"""Recording calibration-time inputs and outputs of one module inside a denoiser, shared by
the training passes (reconstruction, LES, PTS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.models.inputs import NamedInputs
from diffquant.passes.context import PassContext

__all__ = [
    "capture_inputs",
    "capture_output",
    "layer_output",
    "out_tensor",
    "per_sample_loss",
    "pick_samples",
    "select",
]


class _StopForwardError(Exception):
    """Raised by a capture hook once the unit has run: the rest of the model is not needed."""


def pick_samples(ctx: PassContext, n: int) -> tuple[NamedInputs, list[float]]:
    """About ``n`` recorded inputs spread evenly over the calibration timesteps (and, by
    `CalibSet.at`, over each timestep's conditional and unconditional copies), with the
    calibration timestep of each."""
    per = max(1, n // len(ctx.calib.timesteps))
    picked = [ctx.calib.at(t, per) for t in ctx.calib.timesteps]
    tl = [t for t, p in zip(ctx.calib.timesteps, picked) for _ in range(p.size)]
    return NamedInputs.cat(picked), tl


def out_tensor(out) -> torch.Tensor:
    """A unit's output as one tensor. Blocks that return several streams (SD3's joint and Flux's
    double / single blocks return the text and the image tokens) are joined along the token
    axis when their widths agree, else flattened per sample."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    parts = [o for o in out if isinstance(o, torch.Tensor)]
    if len(parts) == 1:
        return parts[0]
    if all(p.dim() == 3 and p.shape[-1] == parts[0].shape[-1] for p in parts):
        return torch.cat(parts, dim=1)
    return torch.cat([p.reshape(len(p), -1) for p in parts], dim=1)


def capture_inputs(model: nn.Module, unit: nn.Module, data, batch: int = 256):
    """The call arguments ``unit`` (a module of ``model``, a Denoiser) receives on ``data``, stored
    batch-wise for `select` (each forward stops right after the unit)."""
    return _capture(model, unit, data, batch, want_inputs=True, want_output=False)[0]


def capture_output(model: nn.Module, unit: nn.Module, data, batch: int = 256) -> torch.Tensor:
    """What ``unit`` returns on ``data``, as one tensor (`out_tensor`), samples in order."""
    return _capture(model, unit, data, batch, want_inputs=False, want_output=True)[1]


@torch.no_grad()
def _capture(model: nn.Module, unit: nn.Module, data, batch: int, *, want_inputs: bool, want_output: bool):
    """Run ``model`` over ``data`` batch by batch (each batch one timestep) and keep the unit's
    call arguments and/or output; stops each forward right after the unit."""
    inputs, tl = data
    calls, outs = [], []

    def pre(_m, args, kwargs):
        if want_inputs:
            calls.append((tuple(args), dict(kwargs), len(args[0]) if args else len(next(iter(kwargs.values())))))

    def post(_m, _a, _k, out):
        if want_output:
            outs.append(out_tensor(out).detach())
        raise _StopForwardError

    h1 = unit.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = unit.register_forward_hook(post, with_kwargs=True)
    try:
        i = 0
        while i < len(tl):
            j = i
            while j < len(tl) and j - i < batch and tl[j] == tl[i]:
                j += 1
            try:
                model(**inputs.take(slice(i, j)))
            except _StopForwardError:
                pass
            i = j
    finally:
        h1.remove()
        h2.remove()
    if not want_inputs:
        return None, torch.cat(outs)
    sizes = [n for _, _, n in calls]

    def collate(vals):
        v0 = vals[0]
        if (
            isinstance(v0, torch.Tensor)
            and v0.dim() > 0
            and all(isinstance(v, torch.Tensor) and v.shape[0] == n for v, n in zip(vals, sizes))
        ):
            return ("batched", torch.cat([v.detach() for v in vals]))
        return ("const", v0)

    args = [collate([a[k] for a, _, _ in calls]) for k in range(len(calls[0][0]))]
    kwargs = {k: collate([kw[k] for _, kw, _ in calls]) for k in calls[0][1]}
    return (args, kwargs), (torch.cat(outs) if want_output else None)


def select(stored, idx: torch.Tensor):
    args, kwargs = stored
    pick = lambda v: v[1][idx] if v[0] == "batched" else v[1]  # noqa: E731
    return [pick(a) for a in args], {k: pick(v) for k, v in kwargs.items()}


def per_sample_loss(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1 of images, last dim of token sequences) and
    averaged over positions, per sample."""
    err = (out - tgt).pow(2)
    channels = err.shape[1] if err.dim() == 4 else err.shape[-1]
    return err.reshape(len(err), -1).mean(dim=1) * channels


def layer_output(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A Conv2d's or Linear's output on input ``x`` with weight ``w`` in place of its own."""
    return mod._conv_forward(x, w, mod.bias) if isinstance(mod, nn.Conv2d) else F.linear(x, w, mod.bias)
