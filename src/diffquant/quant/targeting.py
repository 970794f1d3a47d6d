"""Targeting: one ordered rule list decides which layers are quantized (last match wins).

Resolution starts from deny-all; every Conv2d / Linear is checked against every rule in order
(fnmatch on the module name, optional class filter) and the last rule that matches decides.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

from torch import nn

from diffquant._check import typed_fields
from diffquant.errors import DiffquantError
from diffquant.quant.format import parse_bits

__all__ = ["QUANTIZABLE", "Rule", "TargetDecision", "resolve_targets", "rule_to_dict", "rules_from_dicts"]

QUANTIZABLE: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class Rule:
    """``quantize`` layers whose name matches ``pattern`` (and whose class is in ``classes``,
    if given); ``weights``/``activations`` switch off one side (weight-only, say); ``bits``
    (a bit string such as ``w8a8``) gives the matched layers their own formats instead of the
    plan's (MPQ-DM keeps the time embedding, first and last layer at W8A8)."""

    pattern: str = "*"
    classes: tuple[str, ...] = ()
    quantize: bool = True
    weights: bool = True
    activations: bool = True
    bits: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if self.bits:
            parse_bits(self.bits)

    def matches(self, layer: str, module: nn.Module) -> bool:
        if (
            self.classes
            and type(module).__name__ not in self.classes
            and not any(c.__name__ in self.classes for c in type(module).__mro__)
        ):
            return False
        return fnmatch.fnmatchcase(layer, self.pattern)

    def label(self, index: int) -> str:
        return self.name or f"rule[{index}] {self.pattern}"


@dataclass
class TargetDecision:
    """Which rule decided a layer, and what it decided."""

    layer: str
    op: str
    rule: str
    quantize: bool
    weights: bool = False
    activations: bool = False
    bits: str = ""
    history: list[str] = field(default_factory=list)


def rules_from_dicts(items: list[dict], where: str) -> list[Rule]:
    """Build rules from recipe YAML entries; unknown keys are rejected with their location."""
    if not isinstance(items, list):
        raise DiffquantError(f"{where}: targeting: expected a list of rules, got {items!r}")
    rules = []
    for i, item in enumerate(items):
        fields = typed_fields(Rule, item, f"{where}: targeting[{i}]")
        try:
            rules.append(Rule(**fields))
        except DiffquantError as e:
            raise DiffquantError(f"{where}: targeting[{i}]: {e}") from None
    return rules


def _op_of(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


def resolve_targets(model: nn.Module, rules: list[Rule]) -> dict[str, TargetDecision]:
    """Decide every quantizable layer of ``model``; returns name -> decision in module order."""
    out: dict[str, TargetDecision] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZABLE):
            continue
        dec = TargetDecision(layer=name, op=_op_of(module), rule="deny-all (default)", quantize=False)
        for i, rule in enumerate(rules):
            if rule.matches(name, module):
                dec.rule = rule.label(i)
                dec.quantize = rule.quantize and (rule.weights or rule.activations)
                dec.weights = rule.quantize and rule.weights
                dec.activations = rule.quantize and rule.activations
                dec.bits = rule.bits if rule.quantize else ""
                dec.history.append(dec.rule)
        out[name] = dec
    return out


def rule_to_dict(rule: Rule) -> dict:
    d = asdict(rule)
    d["classes"] = list(rule.classes)
    return d
