"""Passes registered by name, each with one config dataclass (unknown keys rejected, every
field defaulted, a ``version``) and optionally a report hook: what the pass has to show beside a
run's report (files written into the run folder), called by the run job for the passes it ran."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffquant._check import typed_fields
from diffquant.errors import DiffquantError
from diffquant.quant.plan import QuantPlan

__all__ = ["PASSES", "REPORT_HOOKS", "ReportHook", "get_pass", "make_config", "register_pass", "write_pass_reports"]

ReportHook = Callable[[QuantPlan, Path], list[Path]]

PASSES: dict[str, tuple[type, Callable[..., None]]] = {}
REPORT_HOOKS: dict[str, ReportHook] = {}


def register_pass(
    name: str, config_cls: type, report: ReportHook | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: ``@register_pass("minmax", MinMaxConfig)`` on ``fn(ctx, cfg)``; ``report``:
    ``hook(plan, folder) -> files written``, run after a run job's plan is decided."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        PASSES[name] = (config_cls, fn)
        if report is not None:
            REPORT_HOOKS[name] = report
        return fn

    return deco


def get_pass(name: str) -> tuple[type, Callable[..., None]]:
    if name not in PASSES:
        raise DiffquantError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def make_config(name: str, values: dict[str, Any] | None, where: str) -> Any:
    """Build pass ``name``'s config from ``values``: unknown keys, wrong types, an unknown
    ``version`` and out-of-range values raise naming ``where`` and the option."""
    cls, _ = get_pass(name)
    checked = typed_fields(cls, values or {}, f"{where} (pass {name!r})")
    try:
        return cls(**checked)
    except (TypeError, ValueError) as e:
        raise DiffquantError(f"{where}: bad options for pass {name!r}: {e}") from None


def write_pass_reports(plan: QuantPlan, folder: Path) -> list[Path]:
    """Run the report hook of every pass the plan's recipe ran (in recipe order, each once);
    the files they wrote."""
    ran = dict.fromkeys(p["name"] for p in plan.recipe.get("passes", []))
    return [f for name in ran if name in REPORT_HOOKS for f in REPORT_HOOKS[name](plan, folder)]
