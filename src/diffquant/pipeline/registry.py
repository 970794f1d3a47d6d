"""Passes registered by name, each with one config dataclass (unknown keys rejected, every
field defaulted, a ``version``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from diffquant.errors import DiffquantError

__all__ = ["PASSES", "get_pass", "make_config", "register_pass"]

PASSES: dict[str, tuple[type, Callable[..., None]]] = {}


def register_pass(name: str, config_cls: type) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: ``@register_pass("minmax", MinMaxConfig)`` on ``fn(ctx, cfg)``."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        PASSES[name] = (config_cls, fn)
        return fn

    return deco


def get_pass(name: str) -> tuple[type, Callable[..., None]]:
    if name not in PASSES:
        raise DiffquantError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def make_config(name: str, values: dict[str, Any] | None, where: str) -> Any:
    """Build pass ``name``'s config from ``values``; unknown keys raise naming ``where``."""
    cls, _ = get_pass(name)
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        raise DiffquantError(f"{where}: pass {name!r} has no option(s) {sorted(unknown)}; options: {sorted(fields)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise DiffquantError(f"{where}: bad options for pass {name!r}: {e}") from None
