"""FP16 graphs on machines without FP16 kernels (pure onnx: the torch-free build uses it too)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["upcast_float16"]


def _upcast_tensor(t: onnx.TensorProto) -> None:
    if t.data_type == onnx.TensorProto.FLOAT16:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))


def _upcast_type(tp: onnx.TypeProto) -> None:
    if tp.HasField("tensor_type") and tp.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        tp.tensor_type.elem_type = onnx.TensorProto.FLOAT


def upcast_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an FP16 graph computing in FP32 (weights, constants, casts and declared types
    widened): how a CPU backend runs a pipeline part exported in FP16 for TensorRT, since ONNX
    Runtime's CPU kernels lack FP16 for several ops (LayerNorm, Gelu, Softmax inputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graphs = [out.graph]
    while graphs:
        g = graphs.pop()
        for t in g.initializer:
            _upcast_tensor(t)
        for v in [*g.input, *g.output, *g.value_info]:
            _upcast_type(v.type)
        for node in g.node:
            for a in node.attribute:
                if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == onnx.TensorProto.FLOAT16:
                    a.i = onnx.TensorProto.FLOAT
                elif a.type == onnx.AttributeProto.TENSOR:
                    _upcast_tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
    return out
