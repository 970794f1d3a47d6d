"""OpenVINO backend (CPU; the GPU and NPU plugins of Intel edge devices take the same folder):
read the Q/DQ ONNX graph (OpenVINO turns each QuantizeLinear -> DequantizeLinear pair into
FakeQuantize and runs INT8 kernels), fix its shapes to the build profile, compile, and keep both
the IR (``.xml`` + ``.bin``) and the compiled blob in the engine folder. Loading imports the blob
when the OpenVINO version and CPU match the ones in ``engine.json``, else compiles the IR again.
Imported lazily; needs ``pip install 'diffquant[openvino]'``. Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffquant.engines.base import Backend, BatchProfile, Built, Engine
from diffquant.engines.cpu import cpu_info
from diffquant.errors import DiffquantError

__all__ = ["BACKEND", "OvBuildConfig", "OvEngine", "build_ov_engine", "import_openvino", "machine_key"]

PRECISIONS = ("", "f32", "bf16", "f16")
HINTS = ("LATENCY", "THROUGHPUT")


def import_openvino():
    """The ``openvino`` module, or a DiffquantError that says how to get it."""
    try:
        import openvino as ov
    except ImportError as e:
        raise DiffquantError(f"OpenVINO is not installed: pip install 'diffquant[openvino]' ({e})") from None
    return ov


@dataclass
class OvBuildConfig(BatchProfile):
    """OpenVINO settings: the shapes (see `BatchProfile`), the device, the performance hint,
    the thread count (0: the plugin's choice) and the inference precision of the layers left in
    floating point ("": the plugin's default, bf16 on CPUs that have it)."""

    device: str = field(default="CPU", metadata={"help": "OpenVINO device: CPU (tested), GPU, NPU"})
    hint: str = field(default="LATENCY", metadata={"help": "OpenVINO performance hint", "choices": HINTS})
    threads: int = field(default=0, metadata={"help": "CPU threads (default: the runtime's choice)", "min": 0})
    precision: str = field(
        default="",
        metadata={
            "help": "OpenVINO precision of the layers left in floating point (default: the plugin's, bf16 where the "
            "CPU has it)",
            "choices": PRECISIONS,
        },
    )

    def properties(self) -> dict:
        props: dict = {"PERFORMANCE_HINT": self.hint}
        if self.threads:
            props["INFERENCE_NUM_THREADS"] = int(self.threads)
        if self.precision:
            if self.precision not in PRECISIONS:
                raise DiffquantError(f"unknown OpenVINO precision {self.precision!r}; choose from f32, bf16, f16")
            props["INFERENCE_PRECISION_HINT"] = self.precision
        return props


def _input_name(port, wanted: set[str]) -> str:
    names = port.get_names()
    return next((n for n in sorted(names) if n in wanted), port.get_any_name())


def machine_key(ov, device: str) -> dict:
    """What a compiled blob is only valid for: the OpenVINO version, the device and its CPU."""
    return {"openvino": ov.__version__, "device": device, "cpu": cpu_info().describe()}


def build_ov_engine(onnx_path: Path, xml_path: Path, inputs: list, cfg: OvBuildConfig) -> dict:
    """Read ``onnx_path``, reshape it to ``cfg``'s profile over ``inputs`` (runtime.json input
    specs), compile it, and write the IR at ``xml_path`` and the compiled blob beside it (inside the
    temporary folder `build` renames into place)."""
    ov = import_openvino()
    core = ov.Core()
    try:
        model = core.read_model(str(onnx_path))
    except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
        raise DiffquantError(f"OpenVINO could not read {onnx_path}: {e}") from None
    specs = {s.name: s for s in inputs}
    shapes, profile = {}, {}
    for port in model.inputs:
        name = _input_name(port, set(specs))
        if name not in specs:
            raise DiffquantError(f"{onnx_path}: graph input {name!r} is not in runtime.json; export the graph again")
        lo, opt, hi = cfg.shapes(specs[name].shape, specs[name].example)
        shapes[port] = ov.PartialShape([ov.Dimension(a, b) if a != b else ov.Dimension(a) for a, b in zip(lo, hi)])
        profile[name] = [list(lo), list(opt), list(hi)]
    model.reshape(shapes)
    try:
        compiled = core.compile_model(model, cfg.device, cfg.properties())
    except Exception as e:
        raise DiffquantError(f"OpenVINO could not compile {onnx_path} for {cfg.device}: {e}") from None
    ov.save_model(model, str(xml_path), compress_to_fp16=False)  # inside build()'s temporary folder
    blob = compiled.export_model()  # bytes, or a BytesIO in recent releases
    xml_path.with_suffix(".blob").write_bytes(blob.getvalue() if hasattr(blob, "getvalue") else bytes(blob))
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    return {
        **machine_key(ov, cfg.device),
        "precision": precision,
        "profile": profile,
        "build": asdict(cfg),
        "ir": xml_path.name,
        "blob": xml_path.with_suffix(".blob").name,
    }


class OvEngine(Engine):
    """A compiled OpenVINO model with one infer request. Imports the built blob where this
    machine matches the build's OpenVINO version, device and CPU; elsewhere compiles the IR."""

    def __init__(self, xml_path: str | Path, meta: dict, threads: int = 0) -> None:
        ov = import_openvino()
        path = Path(xml_path)
        if not path.exists():
            raise DiffquantError(
                f"OpenVINO model {path} is missing; build the folder again with `diffquant build --backend openvino`"
            )
        cfg = OvBuildConfig(**{**meta.get("build", {}), **({"threads": threads} if threads else {})})
        core = ov.Core()
        blob = path.with_suffix(".blob")
        key = machine_key(ov, cfg.device)
        self.recompiled = ""
        try:
            if blob.exists() and all(meta.get(k) == v for k, v in key.items()):
                self.compiled = core.import_model(blob.read_bytes(), cfg.device, cfg.properties())
            else:
                self.recompiled = (
                    "; ".join(
                        f"{k}: built with {meta.get(k)!r}, here {v!r}" for k, v in key.items() if meta.get(k) != v
                    )
                    or "no compiled blob"
                )
                self.compiled = core.compile_model(str(path), cfg.device, cfg.properties())
        except DiffquantError:
            raise
        except Exception as e:
            raise DiffquantError(f"OpenVINO could not load {path}: {e}") from None
        self.request = self.compiled.create_infer_request()
        outs = [o.get_any_name() for o in self.compiled.outputs]
        self.input_names = [_input_name(p, set(meta.get("profile", {}))) for p in self.compiled.inputs]
        self.output_names = outs
        self._dtypes = {
            n: np.dtype(p.get_element_type().to_dtype()) for n, p in zip(self.input_names, self.compiled.inputs)
        }
        self.max_batch = int(meta.get("profile", {}).get(self.input_names[0], [[0], [0], [0]])[2][0])

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        feeds = {
            k: np.ascontiguousarray(np.asarray(v).astype(self._dtypes[k], copy=False))
            for k, v in feeds.items()
            if k in self._dtypes
        }
        try:
            res = self.request.infer(feeds)
        except Exception as e:
            shapes = {k: v.shape for k, v in feeds.items()}
            raise DiffquantError(
                f"OpenVINO inference failed for inputs {shapes} (outside the build profile? rebuild with --dynamic): "
                f"{e}"
            ) from None
        return {n: np.array(res[self.compiled.output(n)]) for n in outputs or self.output_names}


def _build(onnx_file: Path, out_dir: Path, inputs: list, settings: OvBuildConfig) -> Built:
    xml = onnx_file.with_suffix(".xml").name
    details = build_ov_engine(onnx_file, out_dir / xml, inputs, settings)
    return Built(xml, Path(xml).with_suffix(".bin").name, details)


def _load(path: Path, entry, manifest, threads: int) -> OvEngine:
    return OvEngine(path, entry.details, threads=threads)


BACKEND = Backend(
    name="openvino",
    summary="OpenVINO on Intel CPUs, GPUs and NPUs (fastest from the tensorrt-target graph)",
    settings=OvBuildConfig,
    require=import_openvino,
    build=_build,
    load=_load,
    hashed_file=lambda path: path.with_suffix(".bin"),  # the weights; the .xml is regenerated by the build
    # OpenVINO runs the float layers in bf16 by default: judged on cosine 0.99 and the SNR that
    # cosine implies (1 - cos ~ err^2 / 2 signal^2 -> 17 dB), not the 20 dB of an FP32 graph
    validate=("torch-fake-quant", 0.99, 17.0),
    describe=lambda d: f"OpenVINO {d['openvino']} on {d['device']}, floating-point layers in {d['precision']}",
)
