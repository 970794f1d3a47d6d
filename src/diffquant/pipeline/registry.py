"""Passes registered by name, each with one config dataclass (unknown keys rejected, every
field defaulted, a ``version``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffquant._check import typed_fields
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
    """Build pass ``name``'s config from ``values``: unknown keys, wrong types, an unknown
    ``version`` and out-of-range values raise naming ``where`` and the option."""
    cls, _ = get_pass(name)
    checked = typed_fields(cls, values or {}, f"{where} (pass {name!r})")
    try:
        return cls(**checked)
    except (TypeError, ValueError) as e:
        raise DiffquantError(f"{where}: bad options for pass {name!r}: {e}") from None
