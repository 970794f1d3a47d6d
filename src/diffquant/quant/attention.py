"""Attention probabilities as quantizer sites: an attention processor of ours that wraps the
module's own and computes ``scaled_dot_product_attention`` explicitly, so the softmax output P
that feeds P.V can be observed (calibration) or fake-quantized (TCAQ-DM's DAQ).

The wrapper delegates to the processor the attention module already has (diffusers'
`AttnProcessor2_0`, the joint and Flux processors: anything that calls
``F.scaled_dot_product_attention``) and swaps that one call, under a `TorchFunctionMode`, for
softmax(Q K^T * scale + mask) -> hook(P) -> P V. Everything else the processor does (norms,
projections, rotary embeddings, residuals) is untouched. Duck-typed on ``processor`` /
``set_processor``: the quant room does not import diffusers.

Sites are ``<attention module>:operand#g``, one per timestep group g (a DAQ choice is made per
group): each holds its own format (uniform, or the research-only log2 grid) and step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ExplicitAttention",
    "ProbsQuant",
    "attention_modules",
    "explicit_attention",
    "install_probs_hooks",
    "remove_probs_hooks",
]

ProbsHook = Callable[[torch.Tensor], torch.Tensor]


def explicit_attention(  # noqa: PLR0913 (the signature of F.scaled_dot_product_attention, which it stands in for)
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hook: ProbsHook,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,  # noqa: FBT001, FBT002 (ditto)
    scale: float | None = None,
    enable_gqa: bool = False,  # noqa: FBT001, FBT002 (ditto)
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` written out (no dropout: inference), with ``hook`` on P."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return hook(p) @ v


class _SwapSDPA(TorchFunctionMode):
    """Replace ``F.scaled_dot_product_attention`` calls by `explicit_attention` with ``hook``."""

    def __init__(self, hook: ProbsHook) -> None:
        super().__init__()
        self.hook = hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return explicit_attention(*args, hook=self.hook, **kwargs)
        return func(*args, **kwargs)


class ExplicitAttention:
    """The attention processor of ours: the module's own processor, with SDPA made explicit and
    P passed through ``hook`` (a `ProbsQuant`, or a recorder while calibrating)."""

    def __init__(self, inner, hook: ProbsHook) -> None:
        self.inner = inner
        self.hook = hook

        # diffusers passes a processor only the keyword arguments its __call__ signature names:
        # show the inner processor's signature (inspect follows __wrapped__). Only inspect reads
        # this attribute; calls go through the class's __call__, so a deep copy stays correct.
        @functools.wraps(inner.__call__)
        def call(*args, **kwargs):
            return type(self).__call__(self, *args, **kwargs)

        self.__dict__["__call__"] = call

    def __call__(self, attn: nn.Module, *args, **kwargs):
        with _SwapSDPA(self.hook):
            return self.inner(attn, *args, **kwargs)

    def __getattr__(self, name: str):  # diffusers inspects processor attributes (e.g. the call signature's kwargs)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class ProbsQuant(nn.Module):
    """The fake-quant of one attention module's P: one `SiteQuantizer` per timestep group, the
    group's chosen by ``set_group`` (the plan's group hook calls it)."""

    def __init__(self, quantizers: list[nn.Module]) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(quantizers)
        self.group = 0

    def set_group(self, group: int) -> None:
        self.group = group

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.quantizers[self.group if len(self.quantizers) > 1 else 0](p)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module with an attention processor (diffusers' ``Attention`` and its kin), by name."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")}


def install_probs_hooks(model: nn.Module, hooks: dict[str, ProbsHook]) -> None:
    """Wrap the processor of each named attention module so its P goes through ``hooks[name]``;
    a hook that is a module becomes the attention module's ``probs_quant`` child."""
    mods = attention_modules(model)
    for name, hook in hooks.items():
        attn = mods[name]
        inner = attn.processor.inner if isinstance(attn.processor, ExplicitAttention) else attn.processor
        if isinstance(hook, nn.Module):
            attn.probs_quant = hook
        attn.set_processor(ExplicitAttention(inner, hook))


def remove_probs_hooks(model: nn.Module) -> None:
    """Give every wrapped attention module its own processor back."""
    for attn in attention_modules(model).values():
        if isinstance(attn.processor, ExplicitAttention):
            attn.set_processor(attn.processor.inner)
            if "probs_quant" in attn._modules:
                del attn._modules["probs_quant"]
