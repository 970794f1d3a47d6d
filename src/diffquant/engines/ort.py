"""ONNX Runtime CPU backend. Reference runs disable Q/DQ fusion (`session.disable_quant_qdq`)
so the graph computes plain QuantizeLinear/DequantizeLinear semantics. `fit_weights` makes a
graph's S8 weights exact on the CPU at hand (see `diffquant.engines.cpu`); an engine folder
built for ONNX Runtime holds the graphs so fitted, run with the fused integer kernels."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from diffquant.artifacts import EngineEntry, EngineManifest, PartEntry
from diffquant.engines.base import Backend, Built, Engine
from diffquant.engines.cpu import CpuInfo, cpu_info, full_range
from diffquant.errors import DiffquantError

__all__ = [
    "BACKEND",
    "WEIGHT_MODES",
    "EngineFromOnnx",
    "FusedEngineFromOnnx",
    "OrtBuildConfig",
    "OrtEngine",
    "fit_weights",
    "with_outputs",
]

WEIGHT_MODES = ("auto", "s8", "u8")

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def with_outputs(model: onnx.ModelProto, names: list[str], elem_type: int) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the intermediate tensors ``names`` (pure pass)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for n in names:
        if n not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(n, elem_type, None))
    return out


def _s8_weights(model: onnx.ModelProto) -> dict[str, tuple[onnx.TensorProto, onnx.TensorProto | None]]:
    """DequantizeLinear weight inputs stored as INT8 initializers: name -> (codes, zero point)."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        codes = inits[node.input[0]]
        if codes.data_type == onnx.TensorProto.INT8:
            out[node.input[0]] = (codes, inits.get(node.input[2]) if len(node.input) > 2 else None)
    return out


def fit_weights(
    model: onnx.ModelProto, cpu: CpuInfo, mode: str = "auto", where: str = "the graph"
) -> tuple[onnx.ModelProto, dict]:
    """Make ``model``'s S8 weights exact on ``cpu``: ``auto`` rewrites to U8 (zero point 128, the
    same grid) only the weights whose codes would saturate a non-VNNI int16 pair sum, ``u8``
    rewrites all, ``s8`` keeps all and refuses a graph this CPU would saturate. Returns the
    (possibly rewritten) copy and counts for engine.json."""
    if mode not in WEIGHT_MODES:
        raise DiffquantError(f"unknown weight mode {mode!r}; choose from {', '.join(WEIGHT_MODES)}")
    weights = _s8_weights(model)
    full = [n for n, (codes, _) in weights.items() if full_range(numpy_helper.to_array(codes))]
    wide = [] if cpu.int32_dot else full
    if mode == "s8" and wide:
        raise DiffquantError(
            f"{where}: {len(wide)} weights (e.g. {wide[0]}) use full-range 8-bit codes, which this CPU ({cpu.model}, "
            "no VNNI) "
            "sums in saturating int16; build with --weights auto or u8, or export with --reduce-range (nothing "
            "written)"
        )
    convert = list(weights) if mode == "u8" else wide
    counts = {"s8": len(weights) - len(convert), "u8": len(convert), "full_range_s8": len(set(full) - set(convert))}
    if not convert:
        return model, counts
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    for name in convert:
        codes = numpy_helper.to_array(inits[name]).astype(np.int16)
        inits[name].CopyFrom(numpy_helper.from_array((codes + 128).astype(np.uint8), name))
        zp = weights[name][1]
        if zp is None:
            raise DiffquantError(f"{where}: weight {name} has no zero point input; export it again with diffquant")
        inits[zp.name].CopyFrom(
            numpy_helper.from_array(np.full(numpy_helper.to_array(zp).shape, 128, np.uint8), zp.name)
        )
    return out, counts


class OrtEngine(Engine):
    """An ONNX Runtime CPU session; ``qdq_fusion=False`` gives the reference semantics."""

    def __init__(self, model: str | Path | onnx.ModelProto, *, qdq_fusion: bool = False, threads: int = 0) -> None:
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
            raise DiffquantError(
                f"ONNX Runtime could not load {model if not isinstance(model, onnx.ModelProto) else 'the graph'}: {e}"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = {i.name: np.dtype(_ORT_TYPES.get(i.type, np.float32)) for i in self.session.get_inputs()}

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        feeds = {k: np.asarray(v).astype(self._dtypes[k], copy=False) for k, v in feeds.items()}
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feeds), strict=True))


def FusedEngineFromOnnx(path: str | Path, threads: int = 0) -> OrtEngine:  # noqa: N802
    """Loader: ONNX Runtime's fused integer kernels on the graph at ``path``, with its weights as
    `diffquant build` would deploy them on this CPU (what `run` samples with and `validate` checks)."""
    model, _ = fit_weights(onnx.load(str(path)), cpu_info(), where=str(path))
    return OrtEngine(model, qdq_fusion=True, threads=threads)


def EngineFromOnnx(model: str | Path | onnx.ModelProto, backend: str = "onnxruntime", **kwargs) -> Engine:  # noqa: N802
    """Loader: an ONNX Runtime Engine for ``model``. TensorRT engines are built ahead of time:
    `diffquant build --backend tensorrt`, then `EnginesFromFolder`."""
    if backend == "onnxruntime":
        return OrtEngine(model, **kwargs)
    raise DiffquantError(
        f"backend {backend!r} cannot load an ONNX file directly; build an engine folder with `diffquant build "
        f"--backend {backend}` and load it with EnginesFromFolder"
    )


@dataclass
class OrtBuildConfig:
    """ONNX Runtime build settings: how the S8 weights are made exact on this CPU."""

    weights: str = field(
        default="auto",
        metadata={
            "choices": WEIGHT_MODES,
            "help": "ONNX Runtime weights: auto keeps S8 (fast U8S8 kernels) and rewrites to U8 (exact, slower) only "
            "the full-range weights this CPU would saturate (x86 without VNNI); s8 refuses such a CPU instead; "
            "u8 rewrites all",
        },
    )


def _require():
    try:
        import onnxruntime
    except ImportError:
        raise DiffquantError("onnxruntime is not installed: pip install onnxruntime") from None
    return onnxruntime


def _build(onnx_file: Path, out_dir: Path, inputs: list, settings: OrtBuildConfig) -> Built:
    """The graph with its weights fitted to this CPU (copied as is where nothing changes)."""
    model, weights = fit_weights(onnx.load(str(onnx_file)), cpu_info(), settings.weights, where=str(onnx_file))
    if weights["u8"]:
        onnx.save(model, str(out_dir / onnx_file.name))
    else:
        shutil.copy2(onnx_file, out_dir / onnx_file.name)
    return Built(onnx_file.name, onnx_file.name, {"weights": weights, "onnxruntime": _require().__version__})


def _load(path: Path, entry: EngineEntry | PartEntry, manifest: EngineManifest, threads: int) -> OrtEngine:
    """A denoiser engine runs the fused integer kernels, refused where this CPU would saturate
    weights built for another; a part (no Q/DQ) runs as is."""
    if isinstance(entry, PartEntry):
        return OrtEngine(path, threads=threads)
    here = cpu_info()
    if entry.details.get("weights", {}).get("full_range_s8") and not here.int32_dot:
        built_for = (manifest.cpu or {}).get("model", "?")
        raise DiffquantError(
            f"{path} keeps full-range S8 weights for a CPU with VNNI ({built_for}); this one ({here.model}) "
            f"would saturate them: build the folder again here with `diffquant build`"
        )
    return OrtEngine(path, qdq_fusion=True, threads=threads)


def _describe(details: dict) -> str:
    w = details.get("weights", {})
    if w.get("full_range_s8"):
        return (
            f"{w['s8']} S8 weights ({w['full_range_s8']} full-range, exact here: this CPU has int32 dot products), "
            f"{w['u8']} rewritten to U8"
        )
    return f"{w.get('s8', 0)} S8 weights, {w.get('u8', 0)} rewritten to U8 (exact on this CPU)"


BACKEND = Backend(
    name="onnxruntime",
    summary="ONNX Runtime on this CPU (the onnxruntime-target graph runs its fused integer kernels)",
    settings=OrtBuildConfig,
    require=_require,
    build=_build,
    load=_load,
    describe=_describe,
)
