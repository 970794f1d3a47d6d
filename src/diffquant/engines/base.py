"""The `Engine` interface every backend implements, and `Backend`, what a backend registers
(no torch: engines run on edge devices)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Backend", "BatchProfile", "Built", "Engine"]


@dataclass
class BatchProfile:
    """The input shapes an engine is built for: ``batch`` (the optimum), or with ``dynamic`` any
    batch 1..``max_batch``; other dynamic axes (the text length) stay at the export's example."""

    batch: int = field(default=2, metadata={"help": "profile batch (2 = one image with CFG)", "min": 1})
    dynamic: bool = field(default=False, metadata={"help": "dynamic batch 1..--max-batch (TensorRT, OpenVINO)"})
    max_batch: int = field(default=32, metadata={"help": "largest batch of a --dynamic profile", "min": 1})

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


@dataclass
class Built:
    """What a backend made of one graph: the file its loader opens, the file whose hash
    engine.json records for it (OpenVINO: the weights beside the IR), and its build facts."""

    file: str
    hashed: str
    details: dict


def _same(path: Path) -> Path:
    return path


@dataclass(frozen=True)
class Backend:
    """One way to build and run an engine folder, registered by name in `engines.backends`.

    ``settings``: its build settings (a dataclass, every field defaulted; the CLI's `build`
    options come from its fields). ``require()`` imports its runtime or raises one error saying
    how to install it. ``build(onnx_file, out_dir, inputs, settings) -> Built`` builds one
    denoiser graph; ``build_part`` the same for a pipeline part (None: its folders run the parts
    on ONNX Runtime). ``load(path, entry, manifest, threads) -> Engine`` opens a built engine or
    part. ``lint_target``: the rules its graphs must pass before building (None: the target the
    graph was lowered for); ``takes``: the targets whose graphs it builds; ``records_cpu``:
    engine.json records the building machine's CPU; ``hashed_file``: the file whose hash stands
    for a built engine; ``validate``: `validate --against NAME` as (reference, cosine, SNR dB);
    ``describe(details)``: one line on a built engine for `build`'s summary; ``bisect``: how to
    find the first node that disagrees when its comparison fails (``{graph}``, ``{inputs}``)."""

    name: str
    summary: str
    settings: type
    require: Callable[[], Any]
    build: Callable[..., Built]
    load: Callable[..., Engine]
    build_part: Callable[..., Built] | None = None
    lint_target: str | None = None
    takes: tuple[str, ...] = ("tensorrt", "onnxruntime")
    records_cpu: bool = True
    hashed_file: Callable[[Path], Path] = _same
    validate: tuple[str, float, float] | None = None
    describe: Callable[[dict], str] = lambda details: ""
    bisect: str = ""

    @property
    def part_runner(self) -> str:
        """The backend that runs this backend's pipeline parts."""
        return self.name if self.build_part is not None else "onnxruntime"
