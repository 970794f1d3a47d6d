"""ONNX Runtime CPU backend. Reference runs disable Q/DQ fusion (`session.disable_quant_qdq`)
so the graph computes plain QuantizeLinear/DequantizeLinear semantics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from diffquant.engines.base import Engine
from diffquant.errors import DiffquantError

__all__ = ["EngineFromOnnx", "OrtEngine", "with_outputs"]

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def with_outputs(model: onnx.ModelProto, names: list[str], elem_type: int) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the intermediate tensors ``names`` (pure pass)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for n in names:
        if n not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(n, elem_type, None))
    return out


class OrtEngine(Engine):
    """An ONNX Runtime CPU session; ``qdq_fusion=False`` gives the reference semantics."""

    def __init__(self, model: str | Path | onnx.ModelProto, qdq_fusion: bool = False, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DiffquantError("onnxruntime is not installed: pip install onnxruntime") from None
        opts = ort.SessionOptions()
        if not qdq_fusion:
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        if isinstance(model, onnx.ModelProto):
            src = model.SerializeToString()
        else:
            path = Path(model)
            if not path.exists():
                raise DiffquantError(f"ONNX file {path} does not exist")
            src = str(path)
        try:
            self.session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise DiffquantError(f"ONNX Runtime could not load {model if not isinstance(model, onnx.ModelProto) else 'the graph'}: {e}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = {i.name: np.dtype(_ORT_TYPES.get(i.type, np.float32)) for i in self.session.get_inputs()}

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        feeds = {k: np.asarray(v).astype(self._dtypes[k], copy=False) for k, v in feeds.items()}
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feeds), strict=True))


def EngineFromOnnx(model: str | Path | onnx.ModelProto, backend: str = "onnxruntime", **kwargs) -> Engine:  # noqa: N802
    """Loader: an ONNX Runtime Engine for ``model``. TensorRT engines are built ahead of time:
    `diffquant build --backend tensorrt`, then `EnginesFromFolder`."""
    if backend == "onnxruntime":
        return OrtEngine(model, **kwargs)
    raise DiffquantError(f"backend {backend!r} cannot load an ONNX file directly; build an engine folder with `diffquant build --backend {backend}` and load it with EnginesFromFolder")
