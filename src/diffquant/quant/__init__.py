"""Numerics: formats, fake-quant with ONNX semantics, quantized layers, targeting, the plan."""

from diffquant.quant.fake import fake_quant, round_scale, scale_from_amax
from diffquant.quant.format import BitSetting, QuantFormat, parse_bits
from diffquant.quant.modules import QuantConv2d, QuantLinear, apply_plan, quant_modules
from diffquant.quant.plan import LayerPlan, QuantPlan, reduce_range, weights_digest
from diffquant.quant.targeting import Rule, resolve_targets

__all__ = [
    "BitSetting",
    "LayerPlan",
    "QuantConv2d",
    "QuantFormat",
    "QuantLinear",
    "QuantPlan",
    "Rule",
    "apply_plan",
    "fake_quant",
    "parse_bits",
    "quant_modules",
    "reduce_range",
    "resolve_targets",
    "round_scale",
    "scale_from_amax",
    "weights_digest",
]
