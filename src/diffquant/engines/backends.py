"""The backends, registered by name: what `build`, the engine-folder loader, the CLI's
``--backend`` choices and ``validate --against`` read. A backend is one module that defines a
`Backend` (`engines.base`) named ``BACKEND``; adding one is that file and one line below.
Every backend module imports its runtime lazily, so all of them import on any machine."""

from __future__ import annotations

from importlib import import_module

from diffquant.engines.base import Backend
from diffquant.errors import DiffquantError

__all__ = ["BACKENDS", "get_backend"]

MODULES = (
    "diffquant.engines.ort",
    "diffquant.engines.openvino",
    "diffquant.engines.tensorrt",
)

BACKENDS: dict[str, Backend] = {b.name: b for b in (import_module(m).BACKEND for m in MODULES)}


def get_backend(name: str) -> Backend:
    """The backend called ``name``, or one error listing the registered ones."""
    if name not in BACKENDS:
        raise DiffquantError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
