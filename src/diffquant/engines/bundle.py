"""`build(onnx, config)`: turn an exported Q/DQ graph (and its timestep-group siblings) into an
engine folder, and `EnginesFromFolder` to load one. Torch-free.

An engine folder is the whole pipeline: one denoiser engine per timestep group (TensorRT
``.engine`` files, OpenVINO IR + compiled blob, or the ONNX graphs for ONNX Runtime with their
weights made exact for this CPU), the text encoders and the VAE decoder (`engines.pipeline`:
TensorRT engines, or ONNX graphs run by ONNX Runtime), the tokenizers, ``engine.json`` (every
file's hash, plan digest, backend and versions, GPU or CPU and its ISA flags, profile), and the
export's ``runtime.json`` (scheduler, inputs, how prompts become conditioning) +
``conditioning.safetensors``.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from diffquant._check import check_value, contained, read_json
from diffquant._groups import group_index
from diffquant._io import atomic_folder, write_json
from diffquant.engines.base import Engine
from diffquant.engines.cpu import cpu_info
from diffquant.engines.openvino import OvBuildConfig  # the module imports openvino lazily
from diffquant.engines.ort import OrtEngine, fit_weights
from diffquant.engines.tensorrt import TrtBuildConfig  # the module imports tensorrt lazily
from diffquant.errors import DiffquantError

__all__ = ["BACKENDS", "ENGINE_FILE", "BuildConfig", "GroupedEngine", "EnginesFromFolder", "build", "file_sha256"]

ENGINE_FILE = "engine.json"
ENGINE_VERSION = 2  # 2: engine.json records the hashes of runtime.json and the conditioning
RUNTIME_FILE = "runtime.json"
FP_GRAPH = "unet.fp32.onnx"
BACKENDS = ("onnxruntime", "openvino", "tensorrt")


@dataclass
class BuildConfig:
    """Backend (``auto``: the one the graph was lowered for: ``tensorrt`` for the tensorrt
    target, ``onnxruntime`` for the onnxruntime target), the denoiser graph (``qdq``: the
    quantized one; ``fp``: the FP32 reference, for an all-FP pipeline), plus the backend's settings: ONNX Runtime's weight mode (``auto``: S8 weights, rewritten to
    U8 where this CPU would saturate them; ``s8``: refuse instead; ``u8``: all U8), and the
    OpenVINO and TensorRT build settings."""

    backend: str = "auto"
    denoiser: str = "qdq"
    ort_weights: str = "auto"
    openvino: OvBuildConfig = field(default_factory=OvBuildConfig)
    tensorrt: TrtBuildConfig = field(default_factory=TrtBuildConfig)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_runtime(folder: Path, what: str) -> dict:
    """runtime.json of an export or engine folder, its graph and conditioning files checked to
    name files inside ``folder``."""
    runtime = read_json(folder / RUNTIME_FILE, what, required=("inputs",))
    graphs = check_value(runtime.get("graphs", []), list, f"{folder / RUNTIME_FILE}: graphs")
    for i, g in enumerate(graphs):
        check_value(g, dict, f"{folder / RUNTIME_FILE}: graphs[{i}]")
        contained(folder, g.get("file"), f"{folder / RUNTIME_FILE}: graphs[{i}].file")
    cond = check_value(runtime.get("conditioning", {}), dict, f"{folder / RUNTIME_FILE}: conditioning")
    if "file" in cond:
        contained(folder, cond["file"], f"{folder / RUNTIME_FILE}: conditioning.file")
    return runtime


def _side_files(folder: Path, runtime: dict) -> list[str]:
    """The files an engine folder carries beside its engines: runtime.json, the conditioning
    and the tokenizers."""
    from diffquant.engines.pipeline import tokenizer_files

    cond = runtime.get("conditioning", {}).get("file", "")
    return [RUNTIME_FILE] + ([cond] if cond and (folder / cond).is_file() else []) + tokenizer_files(runtime)


def _lint_or_refuse(onnx_path: Path, backend: str) -> dict:
    from diffquant.exporters.linter import lint, load_onnx  # onnx only; no torch

    model = load_onnx(onnx_path)
    meta = {p.key: p.value for p in model.metadata_props}
    lowered = meta.get("diffquant.target", "")
    if backend == "tensorrt" and lowered and lowered != "tensorrt":
        raise DiffquantError(
            f"{onnx_path} was lowered for the {lowered} target (U8 activations, requantized conv outputs), which TensorRT "
            f"does not take; export the plan again with --target tensorrt (nothing written)"
        )
    target = "tensorrt" if backend == "tensorrt" else None
    rep = lint(model, str(onnx_path), target=target)
    if not rep.ok:
        lines = "\n  ".join(str(v) for v in rep.violations[:15])
        more = f"\n  ... and {len(rep.violations) - 15} more" if len(rep.violations) > 15 else ""
        raise DiffquantError(
            f"{onnx_path} fails the {target or lowered or 'tensorrt'} rules, so it is not built (nothing written):\n  {lines}{more}"
        )
    return meta


def _lowered_for(onnx_path: Path) -> str:
    """The backend a graph was lowered for (its ``diffquant.target`` metadata; tensorrt if none)."""
    from diffquant.exporters.linter import load_onnx  # onnx only; no torch

    meta = {p.key: p.value for p in load_onnx(onnx_path).metadata_props}
    return "onnxruntime" if meta.get("diffquant.target") == "onnxruntime" else "tensorrt"


def _source(onnx_path: str | Path, cfg: BuildConfig) -> tuple[Path, dict, list[dict]]:
    """(export folder, its runtime.json, the denoiser graphs to build) from a Q/DQ graph path or
    a run / export folder; ``cfg.denoiser == "fp"`` builds the FP32 reference graph instead."""
    src = Path(onnx_path)
    if src.is_dir():
        runtime = _read_runtime(src, "build takes a run or export folder (with runtime.json) or its unet.qdq.onnx")
        graphs = runtime.get("graphs") or []
        if not graphs:
            raise DiffquantError(f"{src / RUNTIME_FILE} lists no graphs; export the model again")
        src = src / graphs[0]["file"]
    elif not src.exists():
        raise DiffquantError(f"ONNX file {src} does not exist")
    else:
        runtime = _read_runtime(
            src.parent,
            "build needs the folder `diffquant export` / `run` wrote (it lists the graphs and the conditioning)",
        )
        graphs = runtime.get("graphs") or [{"file": src.name, "timestep_range": []}]
        if src.name not in {g.get("file") for g in graphs}:
            raise DiffquantError(
                f"{src.name} is not one of the exported graphs in {src.parent / RUNTIME_FILE}: {[g['file'] for g in graphs]}"
            )
    if cfg.denoiser not in ("qdq", "fp"):
        raise DiffquantError(f"denoiser must be qdq or fp, got {cfg.denoiser!r}")
    if cfg.denoiser == "fp":
        if not (src.parent / FP_GRAPH).is_file():
            raise DiffquantError(f"{src.parent / FP_GRAPH} is missing; export the model again")
        graphs = [{"file": FP_GRAPH, "timestep_range": []}]
    return src, runtime, graphs


def build(onnx_path: str | Path, out: str | Path, config: BuildConfig | None = None) -> Path:
    """Build the engine folder ``out`` from ``onnx_path`` (a Q/DQ graph, or the run / export
    folder): every denoiser graph of its timestep groups (listed in ``runtime.json``) is linted,
    then built for ``config.backend``, with the pipeline parts the export holds."""
    from diffquant.engines.pipeline import build_parts

    cfg = config or BuildConfig()
    if cfg.backend not in ("auto", *BACKENDS):
        raise DiffquantError(f"unknown backend {cfg.backend!r}; available: auto, {', '.join(BACKENDS)}")
    src, runtime, graphs = _source(onnx_path, cfg)
    auto = cfg.backend == "auto"
    if auto:
        cfg = replace(cfg, backend=_lowered_for(src))
    out = Path(out)
    if out.exists():
        raise DiffquantError(f"output folder {out} already exists; pass another --out or delete it")
    metas = [_lint_or_refuse(src.parent / g["file"], cfg.backend) for g in graphs]
    if cfg.backend == "tensorrt":
        from diffquant.engines.tensorrt import import_tensorrt

        try:
            import_tensorrt()  # fail before any work with the install hint
        except DiffquantError as e:
            if not auto:
                raise
            raise DiffquantError(
                f"{e} (--backend auto picked tensorrt: {src.name} was lowered for it; "
                "--backend openvino also builds it, for a CPU)"
            ) from None
    elif cfg.backend == "openvino":
        from diffquant.engines.openvino import import_openvino

        import_openvino()
    with atomic_folder(out) as tmp:
        entries = [_build_one(src.parent / g["file"], g, meta, runtime, cfg, tmp) for g, meta in zip(graphs, metas)]
        parts = build_parts(src.parent, runtime, cfg.backend, cfg, tmp, file_sha256)
        side = {}
        for name in _side_files(src.parent, runtime):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(contained(src.parent, name, f"{src.parent / RUNTIME_FILE}: {name}"), tmp / name)
            side[name] = file_sha256(tmp / name)
        machine = {"cpu": cpu_info().to_dict()} if cfg.backend != "tensorrt" else {}
        write_json(
            tmp / ENGINE_FILE,
            {
                "version": ENGINE_VERSION,
                "backend": cfg.backend,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "config": asdict(cfg),
                **machine,
                "engines": entries,
                "parts": parts,
                "files_sha256": side,
                "source": str(src.parent),
            },
        )
    return out


def _build_one(onnx_file: Path, g: dict, meta: dict, runtime: dict, cfg: BuildConfig, tmp: Path) -> dict:
    """Build one timestep group's graph into ``tmp``; returns its engine.json entry."""
    entry = {
        "onnx": g["file"],
        "onnx_sha256": file_sha256(onnx_file),
        "timestep_range": g["timestep_range"],
        "plan_model_digest": meta.get("diffquant.plan_model_digest", ""),
    }
    if cfg.backend == "tensorrt":
        from diffquant.engines.tensorrt import build_trt_engine

        entry["file"] = Path(g["file"]).with_suffix(".engine").name
        entry.update(build_trt_engine(onnx_file, tmp / entry["file"], runtime["inputs"], cfg.tensorrt))
    elif cfg.backend == "openvino":
        from diffquant.engines.openvino import build_ov_engine

        entry["file"] = Path(g["file"]).with_suffix(".xml").name
        entry.update(build_ov_engine(onnx_file, tmp / entry["file"], runtime["inputs"], cfg.openvino))
        entry["file_sha256"] = file_sha256(tmp / Path(entry["file"]).with_suffix(".bin"))  # the weights
    else:
        import onnx
        import onnxruntime

        model, entry["weights"] = fit_weights(
            onnx.load(str(onnx_file)), cpu_info(), cfg.ort_weights, where=str(onnx_file)
        )
        entry["file"] = g["file"]
        if entry["weights"]["u8"]:
            onnx.save(model, str(tmp / g["file"]))
        else:
            shutil.copy2(onnx_file, tmp / g["file"])
        entry["file_sha256"] = file_sha256(tmp / g["file"])
        entry["onnxruntime"] = onnxruntime.__version__
    return entry


class GroupedEngine(Engine):
    """One engine per timestep group behind one `Engine`: each run goes to the engine of its
    batch's timestep (a batch that mixes groups is refused)."""

    def __init__(self, engines: list[Engine], ranges: list[list[float]]) -> None:
        self.engines, self.ranges = engines, [r for r in ranges if r]
        self.input_names, self.output_names = engines[0].input_names, engines[0].output_names
        self.max_batch = min(getattr(e, "max_batch", 0) or 1 << 30 for e in engines)

    def input_dtype(self, name: str) -> np.dtype:
        return self.engines[0].input_dtype(name)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if len(self.engines) == 1:
            return self.engines[0].run(feeds, outputs)
        groups = {group_index(float(t), self.ranges) for t in np.asarray(feeds["timestep"]).reshape(-1)}
        if len(groups) != 1:
            raise DiffquantError(f"one batch mixes timestep groups {sorted(groups)}")
        return self.engines[groups.pop()].run(feeds, outputs)

    def close(self) -> None:
        for e in self.engines:
            e.close()
        super().close()


def _engine_meta(folder: Path) -> dict:
    """engine.json checked against its schema (version, backend, one entry per engine naming a
    file inside the folder), and the folder's side files against the hashes it recorded."""
    path, again = folder / ENGINE_FILE, "build the engine folder again with `diffquant build`"
    if not path.exists():
        raise DiffquantError(f"{folder} is not an engine folder (no {ENGINE_FILE}); make one with `diffquant build`")
    meta = read_json(path, again, required=("version", "backend", "engines"))
    if meta["version"] != ENGINE_VERSION:
        raise DiffquantError(
            f"{path}: engine folder version {meta['version']!r}; this diffquant reads version {ENGINE_VERSION}: {again}"
        )
    check_value(meta["backend"], typing.Literal[BACKENDS], f"{path}: backend", again)
    engines = check_value(meta["engines"], list, f"{path}: engines", again)
    if not engines:
        raise DiffquantError(f"{path}: engines: the list is empty; {again}")
    for i, e in enumerate(engines):
        check_value(e, dict, f"{path}: engines[{i}]", again)
        for key in ("file", "onnx_sha256", "timestep_range"):
            if key not in e:
                raise DiffquantError(f"{path}: engines[{i}]: missing key {key!r}; {again}")
        contained(folder, e["file"], f"{path}: engines[{i}].file")
        check_value(e["timestep_range"], list[float], f"{path}: engines[{i}].timestep_range", again)
    hashes = check_value(meta.get("files_sha256", {}), dict, f"{path}: files_sha256", again)
    for name, digest in hashes.items():
        side = contained(folder, name, f"{path}: files_sha256")
        if not side.is_file() or file_sha256(side) != digest:
            raise DiffquantError(
                f"{side} {'is missing' if not side.is_file() else 'changed since the folder was built (hash mismatch)'}; {again}"
            )
    return meta


def EnginesFromFolder(folder: str | Path, threads: int = 0) -> tuple[GroupedEngine, dict]:  # noqa: N802
    """Loader: the engines of a built folder as one `GroupedEngine`, plus its runtime.json.
    Checks engine.json's schema, that every file it names lies inside the folder and still has
    the hash it was built with (engines, runtime.json, conditioning)."""
    folder = Path(folder)
    meta = _engine_meta(folder)
    runtime = _read_runtime(folder, "the engine folder is incomplete; build it again")
    missing = [n for n in _side_files(folder, runtime) if n not in meta.get("files_sha256", {})]
    if missing:
        raise DiffquantError(
            f"{folder / ENGINE_FILE}: {missing} carry no recorded hash; build the engine folder again with `diffquant build`"
        )
    engines: list[Engine] = []
    try:
        for e in meta["engines"]:
            path = contained(folder, e["file"], f"{folder / ENGINE_FILE}: file")
            if not path.exists():
                raise DiffquantError(f"engine file {path} is missing; build the folder again with `diffquant build`")
            engines.append(_load_one(path, e, meta, threads))
    except Exception:
        for eng in engines:
            eng.close()
        raise
    return GroupedEngine(engines, [e["timestep_range"] for e in meta["engines"]]), runtime


def _load_one(path: Path, entry: dict, meta: dict, threads: int) -> Engine:
    """One built engine of a folder, refused where this machine cannot run it as built."""
    if meta["backend"] == "tensorrt":
        from diffquant.engines.tensorrt import TrtEngine

        return TrtEngine(path, entry)
    checked = path.with_suffix(".bin") if meta["backend"] == "openvino" else path
    if file_sha256(checked) != entry.get("file_sha256", entry["onnx_sha256"]):
        raise DiffquantError(f"{checked} changed since it was built (hash mismatch); build the folder again")
    if meta["backend"] == "openvino":
        from diffquant.engines.openvino import OvEngine

        return OvEngine(path, entry, threads=threads)
    here = cpu_info()
    if entry.get("weights", {}).get("full_range_s8") and not here.int32_dot:
        raise DiffquantError(
            f"{path} keeps full-range S8 weights for a CPU with VNNI ({meta.get('cpu', {}).get('model', '?')}); this one ({here.model}) "
            f"would saturate them: build the folder again here with `diffquant build`"
        )
    return OrtEngine(path, qdq_fusion=True, threads=threads)
