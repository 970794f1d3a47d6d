"""Engines: the `Engine` interface, ONNX Runtime and TensorRT (lazy) backends, engine folders,
and the torch-free runtime sampler behind `diffquant generate`."""

from diffquant.engines.base import Engine
from diffquant.engines.bundle import BuildConfig, EnginesFromFolder, GroupedEngine, build
from diffquant.engines.ort import EngineFromOnnx, OrtEngine, with_outputs
from diffquant.engines.runtime import GenerateConfig, PromptTable, generate

__all__ = [
    "BuildConfig",
    "Engine",
    "EngineFromOnnx",
    "EnginesFromFolder",
    "GenerateConfig",
    "GroupedEngine",
    "OrtEngine",
    "PromptTable",
    "build",
    "generate",
    "with_outputs",
]
