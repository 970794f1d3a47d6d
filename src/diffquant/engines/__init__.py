"""Engines: the `Engine` interface, the registered backends (ONNX Runtime, OpenVINO and TensorRT,
the latter two imported lazily), building and loading engine folders, and the torch-free runtime
sampler and deployed pipeline behind `diffquant generate` and `serve`."""

from diffquant.engines.backends import BACKENDS, get_backend
from diffquant.engines.base import Backend, Engine
from diffquant.engines.build import BuildConfig, build
from diffquant.engines.folder import EnginesFromFolder, GroupedEngine
from diffquant.engines.openvino import OvBuildConfig, OvEngine
from diffquant.engines.ort import EngineFromOnnx, FusedEngineFromOnnx, OrtBuildConfig, OrtEngine, with_outputs
from diffquant.engines.runtime import GenerateConfig, PromptTable, generate
from diffquant.engines.tensorrt import TrtBuildConfig

__all__ = [
    "BACKENDS",
    "Backend",
    "BuildConfig",
    "Engine",
    "EngineFromOnnx",
    "EnginesFromFolder",
    "FusedEngineFromOnnx",
    "GenerateConfig",
    "GroupedEngine",
    "OrtBuildConfig",
    "OrtEngine",
    "OvBuildConfig",
    "OvEngine",
    "PromptTable",
    "TrtBuildConfig",
    "build",
    "generate",
    "get_backend",
    "with_outputs",
]
