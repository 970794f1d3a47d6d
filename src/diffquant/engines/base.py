"""The `Engine` interface every backend implements (no torch: engines run on edge devices)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

__all__ = ["BatchProfile", "Engine"]


@dataclass
class BatchProfile:
    """The input shapes an engine is built for: ``batch`` (the optimum), or with ``dynamic`` any
    batch 1..``max_batch``; other dynamic axes (the text length) stay at the export's example."""

    batch: int = 2
    dynamic: bool = False
    max_batch: int = 0

    def shapes(self, spec_shape: list, example: list | None = None) -> tuple[tuple, tuple, tuple]:
        """(min, opt, max) of one input from its runtime.json shape (``"batch"`` marks the axis)."""
        example = example or spec_shape

        def fill(b: int) -> tuple:
            return tuple(
                b if d == "batch" else int(e) if isinstance(d, str) else int(d) for d, e in zip(spec_shape, example)
            )

        if not self.dynamic:
            return fill(self.batch), fill(self.batch), fill(self.batch)
        return fill(1), fill(self.batch), fill(max(self.max_batch, self.batch))


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
