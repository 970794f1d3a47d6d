"""Numerics: formats, fake-quant with ONNX semantics, quantized layers, targeting, the plan."""

from diffquant.quant.fake import fake_quant, round_scale, scale_from_amax
from diffquant.quant.format import BitSetting, PerAxis, PerBlock, PerTensor, QuantFormat, parse_bits
from diffquant.quant.modules import QuantConv2d, QuantLinear, SiteQuantizer, apply_plan, fake_quant_forms, quant_modules
from diffquant.quant.plan import BitsSummary, LayerPlan, PassReport, QuantPlan, reduce_range, weights_digest
from diffquant.quant.site import Site, SiteKey
from diffquant.quant.targeting import Rule, resolve_targets

__all__ = [
    "BitSetting",
    "BitsSummary",
    "LayerPlan",
    "PassReport",
    "PerAxis",
    "PerBlock",
    "PerTensor",
    "QuantConv2d",
    "QuantFormat",
    "QuantLinear",
    "QuantPlan",
    "Rule",
    "Site",
    "SiteKey",
    "SiteQuantizer",
    "apply_plan",
    "fake_quant_forms",
    "fake_quant",
    "parse_bits",
    "quant_modules",
    "reduce_range",
    "resolve_targets",
    "round_scale",
    "scale_from_amax",
    "weights_digest",
]
