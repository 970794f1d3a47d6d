"""The `Engine` interface every backend implements (no torch: engines run on edge devices)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

__all__ = ["Engine"]


class Engine(ABC):
    """A loaded graph that maps named numpy inputs to named numpy outputs. Use as a context
    manager so backends can release device memory deterministically."""

    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run once; returns the requested outputs (all by default)."""

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32)

    closed: bool = False

    def close(self) -> None:
        """Release resources; backends that hold device memory extend this."""
        self.closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
