"""Engines: the `Engine` interface and backends (ONNX Runtime; TensorRT imported lazily)."""

from diffquant.engines.base import Engine
from diffquant.engines.ort import EngineFromOnnx, OrtEngine, with_outputs

__all__ = ["Engine", "EngineFromOnnx", "OrtEngine", "with_outputs"]
