"""Engines: the `Engine` interface, ONNX Runtime, OpenVINO (lazy) and TensorRT (lazy) backends,
engine folders, and the torch-free runtime sampler behind `diffquant generate`."""

from diffquant.engines.base import Engine
from diffquant.engines.bundle import BuildConfig, EnginesFromFolder, GroupedEngine, build
from diffquant.engines.openvino import OvBuildConfig, OvEngine
from diffquant.engines.ort import EngineFromOnnx, FusedEngineFromOnnx, OrtEngine, with_outputs
from diffquant.engines.runtime import GenerateConfig, PromptTable, generate

__all__ = [
    "BuildConfig",
    "Engine",
    "EngineFromOnnx",
    "EnginesFromFolder",
    "FusedEngineFromOnnx",
    "GenerateConfig",
    "GroupedEngine",
    "OrtEngine",
    "OvBuildConfig",
    "OvEngine",
    "PromptTable",
    "build",
    "generate",
    "with_outputs",
]
