"""TensorRT backend (10.x and 11.x): build a strongly typed engine from a Q/DQ ONNX graph, and
load and run it with device buffers. Imported lazily; needs ``tensorrt`` and a CUDA runtime.

Written against the documented Python API: strongly typed networks (10.x: the STRONGLY_TYPED
creation flag; 11.x: always, no precision flags), one optimization profile, builder
optimization level, a timing cache keyed by GPU + TensorRT + CUDA version, and the name-based
tensor API (``set_tensor_address`` + ``execute_async_v3``). Device memory goes through
Polygraphy's torch-free CUDA wrapper. Its tests live in ``tests/gpu`` and run only where
``tensorrt`` imports.
"""

from __future__ import annotations

import ctypes
import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from diffquant._io import atomic_path
from diffquant.engines.base import Backend, BatchProfile, Built, Engine
from diffquant.errors import DiffquantError

__all__ = ["BACKEND", "TrtBuildConfig", "TrtEngine", "build_trt_engine", "device_key", "import_tensorrt"]

INSTALL_HINT = (
    "TensorRT is not installed here. Install its Python package and libraries from NVIDIA's index "
    "(pip install 'diffquant[trt]', which pulls tensorrt-cu12 from https://pypi.nvidia.com), or build "
    "docker/Dockerfile (an NVIDIA TensorRT base image). On a CPU machine use --backend onnxruntime."
)


def import_tensorrt():
    """The ``tensorrt`` module, or a DiffquantError that says how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DiffquantError(f"{INSTALL_HINT} ({e})") from None
    if not hasattr(trt, "Builder"):  # the PyPI placeholder package has no bindings
        raise DiffquantError(f"{INSTALL_HINT} (the installed 'tensorrt' package is a placeholder without libraries)")
    return trt


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def device_key() -> dict:
    """GPU name, compute capability, CUDA runtime and TensorRT versions: what an engine and a
    timing cache are only valid for."""
    trt = import_tensorrt()
    from polygraphy import cuda

    lib = cuda.wrapper().handle
    ver, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    lib.cudaRuntimeGetVersion(ctypes.byref(ver))
    lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)  # cudaDevAttrComputeCapabilityMajor
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # cudaDevAttrComputeCapabilityMinor
    props = ctypes.create_string_buffer(4096)  # cudaDeviceProp starts with char name[256]
    lib.cudaGetDeviceProperties(props, 0)
    name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace")
    cuda_ver = f"{ver.value // 1000}.{ver.value % 1000 // 10}"
    return {
        "gpu": name,
        "compute_capability": f"{major.value}.{minor.value}",
        "cuda": cuda_ver,
        "tensorrt": trt.__version__,
    }


@dataclass
class TrtBuildConfig(BatchProfile):
    """Engine build settings: the profile's batch (see `BatchProfile`), builder optimization
    level, workspace, and the timing cache folder."""

    opt_level: int = field(
        default=4, metadata={"help": "TensorRT builder optimization level (0-5)", "choices": tuple(range(6))}
    )
    workspace_gb: float = field(default=4.0, metadata={"help": "TensorRT workspace limit in GiB"})
    timing_cache_dir: str = field(
        default="",
        metadata={"help": "timing cache folder (default ~/.cache/diffquant/trt_timing)", "flag": "--timing-cache"},
    )


def _cache_path(cfg: TrtBuildConfig, key: dict) -> Path:
    folder = Path(cfg.timing_cache_dir or Path.home() / ".cache" / "diffquant" / "trt_timing")
    tag = hashlib.sha256(
        f"{key['gpu']}|{key['compute_capability']}|{key['tensorrt']}|{key['cuda']}".encode()
    ).hexdigest()[:16]
    return folder / f"timing-{tag}.cache"


def build_trt_engine(onnx_path: Path, engine_path: Path, inputs: list, cfg: TrtBuildConfig) -> dict:
    """Parse ``onnx_path``, build a strongly typed engine with one profile over ``inputs``
    (runtime.json input specs), write it atomically to ``engine_path``; returns its metadata."""
    trt = import_tensorrt()
    key = device_key()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if _major(trt) >= 11:
        network = builder.create_network()  # strongly typed is the only mode
    else:
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DiffquantError(f"TensorRT could not parse {onnx_path}:\n  {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = cfg.opt_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
    cache_file = _cache_path(cfg, key)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    shapes = {}
    for spec in inputs:
        shapes[spec.name] = cfg.shapes(spec.shape, spec.example)
        profile.set_shape(spec.name, *shapes[spec.name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DiffquantError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    with atomic_path(cache_file) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        **key,
        "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
        "build": asdict(cfg),
        "timing_cache": str(cache_file),
    }


class TrtEngine(Engine):
    """A deserialized engine with one execution context; refuses an engine whose metadata names
    another GPU, TensorRT or CUDA version than this machine's."""

    def __init__(self, engine_path: str | Path, meta: dict | None = None) -> None:
        trt = import_tensorrt()
        from polygraphy import cuda
        from polygraphy.datatype import DataType

        path = Path(engine_path)
        if not path.exists():
            raise DiffquantError(
                f"engine file {path} does not exist; build it with `diffquant build ... --backend tensorrt`"
            )
        if meta:
            here = device_key()
            wrong = [
                f"{k}: built for {meta.get(k)!r}, this machine has {here[k]!r}"
                for k in ("gpu", "compute_capability", "tensorrt", "cuda")
                if meta.get(k) != here[k]
            ]
            if wrong:
                raise DiffquantError(
                    f"engine {path} does not match this machine ({'; '.join(wrong)}): rebuild it here with `diffquant "
                    "build`"
                )
        self._cuda, self._dt = cuda, DataType
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise DiffquantError(f"TensorRT could not deserialize {path} (built with another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, object] = {}
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_names[0], 0)[2][0])

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def _buffer(self, name: str, shape: tuple):
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = self._cuda.DeviceArray(
                shape=shape, dtype=self._dt.from_dtype(self._dtypes[name])
            )
        buf.resize(shape)
        return buf

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        for name in self.input_names:
            host = np.ascontiguousarray(np.asarray(feeds[name]).astype(self._dtypes[name], copy=False))
            self.context.set_input_shape(name, host.shape)
            buf = self._buffer(name, host.shape)
            buf.copy_from(host, self.stream)
            self.context.set_tensor_address(name, buf.ptr)
        result = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            self.context.set_tensor_address(name, self._buffer(name, shape).ptr)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise DiffquantError("TensorRT execution failed (see the TensorRT log)")
        for name in outputs or self.output_names:
            buf = self._buffers[name]
            host = np.empty(buf.shape, dtype=self._dtypes[name])
            buf.copy_to(host, self.stream)
            result[name] = host
        self.stream.synchronize()
        return result

    def close(self) -> None:
        for buf in self._buffers.values():
            buf.free()
        self._buffers.clear()
        self.stream.free()
        super().close()


def _build(onnx_file: Path, out_dir: Path, inputs: list, settings: TrtBuildConfig) -> Built:
    name = onnx_file.with_suffix(".engine").name
    return Built(name, name, build_trt_engine(onnx_file, out_dir / name, inputs, settings))


def _build_part(onnx_file: Path, out_dir: Path, inputs: list, settings: TrtBuildConfig) -> Built:
    """A pipeline part with a dynamic batch up to the denoiser profile's largest."""
    profile = replace(settings, dynamic=True, max_batch=max(settings.max_batch, settings.batch))
    return _build(onnx_file, out_dir, inputs, profile)


def _load(path: Path, entry, manifest, threads: int) -> TrtEngine:
    return TrtEngine(path, entry.details)


BACKEND = Backend(
    name="tensorrt",
    summary="TensorRT on an NVIDIA GPU (strongly typed engines from the tensorrt-target graph)",
    settings=TrtBuildConfig,
    require=import_tensorrt,
    build=_build,
    build_part=_build_part,
    load=_load,
    lint_target="tensorrt",
    takes=("tensorrt",),
    records_cpu=False,
    validate=("ort-qdq", 0.99, 20.0),
    describe=lambda d: f"TensorRT {d['tensorrt']} on {d['gpu']} (SM {d['compute_capability']}), CUDA {d['cuda']}",
    bisect="Bisect the graph with: polygraphy debug reduce {graph} -o reduced.onnx --mode=bisect --load-inputs "
    "{inputs} --check polygraphy run polygraphy_debug.onnx --onnxrt --trt --load-inputs {inputs}",
)
