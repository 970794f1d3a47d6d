"""`build(onnx, out, config)`: turn an export (its Q/DQ graphs, one per timestep group, and its
pipeline parts) into an engine folder with one registered backend (`engines.backends`).
Torch-free.

An engine folder is the whole pipeline: one denoiser engine per timestep group (TensorRT
``.engine`` files, OpenVINO IR + compiled blob, or the ONNX graphs for ONNX Runtime with their
weights made exact for this CPU), the text encoders and the VAE decoder (engines of the backend
where it builds parts, else ONNX graphs run by ONNX Runtime), the tokenizers, the export's
``runtime.json`` and ``conditioning.safetensors``, and ``engine.json`` (`artifacts.EngineManifest`:
every file's hash, the plan digest, backend, settings and versions, GPU or CPU and its ISA flags).
Loading is `engines.folder`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from diffquant._check import contained
from diffquant._io import atomic_folder
from diffquant.artifacts import (
    ENGINE_VERSION,
    FP_GRAPH,
    RUNTIME_FILE,
    EngineEntry,
    EngineManifest,
    GraphEntry,
    InputEntry,
    PartEntry,
    RuntimeSpec,
    TextEncoderEntry,
    VaeEntry,
    file_sha256,
)
from diffquant.engines.backends import BACKENDS, get_backend
from diffquant.engines.base import Backend
from diffquant.engines.cpu import cpu_info
from diffquant.errors import DiffquantError
from diffquant.targets import TARGETS, get_target

__all__ = ["BuildConfig", "build"]

DENOISERS = ("qdq", "fp")


@dataclass
class BuildConfig:
    """Backend (``auto``: the one the graph's target names: ``tensorrt`` for the tensorrt target,
    ``onnxruntime`` for the onnxruntime target), the denoiser graph (``qdq``: the quantized one;
    ``fp``: the FP32 reference, for an all-FP pipeline), and the backend's settings: an instance
    of its `Backend.settings` class, or None for one made from ``options`` (field values by name;
    those the backend's settings lack are ignored, so one set serves whichever backend ``auto``
    picks) over its defaults."""

    backend: str = "auto"
    denoiser: str = "qdq"
    settings: Any = None
    options: dict[str, Any] = field(default_factory=dict)


def build(onnx_path: str | Path, out: str | Path, config: BuildConfig | None = None) -> Path:
    """Build the engine folder ``out`` from ``onnx_path`` (a Q/DQ graph, or the run / export
    folder): every denoiser graph of its timestep groups (listed in ``runtime.json``) is linted,
    then built with ``config.backend``, with the pipeline parts the export holds."""
    cfg = config or BuildConfig()
    if cfg.backend not in ("auto", *BACKENDS):
        raise DiffquantError(f"unknown backend {cfg.backend!r}; available: auto, {', '.join(BACKENDS)}")
    src, runtime, graphs = _source(onnx_path, cfg)
    lowered = _lowered_for(src)
    backend = get_backend(get_target(lowered).backend if cfg.backend == "auto" else cfg.backend)
    settings = _settings(backend, cfg.settings, cfg.options)
    out = Path(out)
    if out.exists():
        raise DiffquantError(f"output folder {out} already exists; pass another --out or delete it")
    metas = [_lint_or_refuse(src.parent / g.file, backend) for g in graphs]
    _require(backend, src, auto=cfg.backend == "auto", lowered=lowered)
    with atomic_folder(out) as tmp:
        engines = [
            _build_engine(src.parent, g, meta, runtime, backend, settings, tmp) for g, meta in zip(graphs, metas)
        ]
        parts = {
            n: _build_part(src.parent, e, runtime, backend, settings, tmp) for n, e in runtime.part_graphs().items()
        }
        EngineManifest(
            version=ENGINE_VERSION,
            backend=backend.name,
            built=time.strftime("%Y-%m-%dT%H:%M:%S"),
            config={"backend": backend.name, "denoiser": cfg.denoiser, "settings": asdict(settings)},
            cpu=cpu_info().to_dict() if backend.records_cpu else None,
            engines=engines,
            parts=parts,
            files_sha256=_copy_side_files(src.parent, runtime, tmp),
            source=str(src.parent),
        ).write(tmp)
    return out


def _settings(backend: Backend, given: Any, options: dict[str, Any]) -> Any:
    if given is None:
        names = {f.name for f in fields(backend.settings)}
        return backend.settings(**{k: v for k, v in options.items() if k in names})
    if not isinstance(given, backend.settings):
        raise DiffquantError(
            f"the {backend.name} backend takes {backend.settings.__name__} settings, not {type(given).__name__}"
        )
    return given


def _source(onnx_path: str | Path, cfg: BuildConfig) -> tuple[Path, RuntimeSpec, list[GraphEntry]]:
    """(a denoiser graph of the export, its runtime spec, the denoiser graphs to build) from a
    Q/DQ graph path or a run / export folder; ``cfg.denoiser == "fp"`` builds the FP32 reference
    graph instead."""
    if cfg.denoiser not in DENOISERS:
        raise DiffquantError(f"denoiser must be one of {', '.join(DENOISERS)}, got {cfg.denoiser!r}")
    src = Path(onnx_path)
    if src.is_dir():
        runtime = RuntimeSpec.read(src, "build takes a run or export folder (with runtime.json) or its unet.qdq.onnx")
        if not runtime.graphs:
            raise DiffquantError(f"{src / RUNTIME_FILE} lists no graphs; export the model again")
        src = src / runtime.graphs[0].file
    elif not src.exists():
        raise DiffquantError(f"ONNX file {src} does not exist")
    else:
        hint = "build needs the folder `diffquant export` / `run` wrote (it lists the graphs and the conditioning)"
        runtime = RuntimeSpec.read(src.parent, hint)
        if src.name not in {g.file for g in runtime.graphs}:
            names = [g.file for g in runtime.graphs]
            raise DiffquantError(
                f"{src.name} is not one of the exported graphs in {src.parent / RUNTIME_FILE}: {names}"
            )
    if cfg.denoiser == "fp":
        if not (src.parent / FP_GRAPH).is_file():
            raise DiffquantError(f"{src.parent / FP_GRAPH} is missing; export the model again")
        return src, runtime, [GraphEntry(FP_GRAPH, [])]
    return src, runtime, runtime.graphs


def _lowered_for(onnx_path: Path) -> str:
    """The target a graph was lowered for (its ``diffquant.target`` metadata; tensorrt if none)."""
    from diffquant.exporters.linter import load_onnx  # onnx only; no torch

    meta = {p.key: p.value for p in load_onnx(onnx_path).metadata_props}
    target = meta.get("diffquant.target", "")
    return target if target in TARGETS else "tensorrt"


def _lint_or_refuse(onnx_path: Path, backend: Backend) -> dict:
    """The graph's metadata, once it is known to be a graph ``backend`` takes and passes the
    rules it is built under (the backend's, else those of the target it was lowered for)."""
    from diffquant.exporters.linter import lint, load_onnx  # onnx only; no torch

    model = load_onnx(onnx_path)
    meta = {p.key: p.value for p in model.metadata_props}
    lowered = meta.get("diffquant.target", "")
    if lowered and lowered not in backend.takes:
        raise DiffquantError(
            f"{onnx_path} was lowered for the {lowered} target ({get_target(lowered).summary}), which {backend.name} "
            f"does not take; export the plan again with --target {backend.takes[0]} (nothing written)"
        )
    rep = lint(model, str(onnx_path), target=backend.lint_target)
    if not rep.ok:
        lines = "\n  ".join(str(v) for v in rep.violations[:15])
        more = f"\n  ... and {len(rep.violations) - 15} more" if len(rep.violations) > 15 else ""
        raise DiffquantError(
            f"{onnx_path} fails the {rep.target} rules, so it is not built (nothing written):\n  {lines}{more}"
        )
    return meta


def _require(backend: Backend, src: Path, *, auto: bool, lowered: str) -> None:
    """Fail before any work, with the install hint, where the backend's runtime is missing."""
    try:
        backend.require()
    except DiffquantError as e:
        if not auto:
            raise
        others = [b.name for b in BACKENDS.values() if b is not backend and lowered in b.takes]
        raise DiffquantError(
            f"{e} (--backend auto picked {backend.name}: {src.name} was lowered for it; "
            f"--backend {' or '.join(others)} also builds it)"
        ) from None


def _build_engine(
    src: Path, g: GraphEntry, meta: dict, runtime: RuntimeSpec, backend: Backend, settings: Any, tmp: Path
) -> EngineEntry:
    """Build one timestep group's graph into ``tmp``."""
    onnx_file = src / g.file
    built = backend.build(onnx_file, tmp, runtime.inputs, settings)
    return EngineEntry(
        file=built.file,
        onnx=g.file,
        onnx_sha256=file_sha256(onnx_file),
        timestep_range=g.timestep_range,
        plan_model_digest=meta.get("diffquant.plan_model_digest", ""),
        file_sha256=file_sha256(tmp / built.hashed),
        details=built.details,
    )


def _part_inputs(entry: TextEncoderEntry | VaeEntry, runtime: RuntimeSpec) -> list[InputEntry]:
    """A part's inputs as runtime-spec inputs, for a backend's build profile."""
    if isinstance(entry, TextEncoderEntry):
        names = ["input_ids", "attention_mask"] if entry.feed_mask else ["input_ids"]
        return [InputEntry(n, "int64", ["batch", entry.max_length]) for n in names]
    shape = runtime.sample_shape if entry.input == "latents" else entry.shape
    return [InputEntry(entry.input, entry.dtype, ["batch", *shape])]


def _build_part(
    src: Path, entry: TextEncoderEntry | VaeEntry, runtime: RuntimeSpec, backend: Backend, settings: Any, tmp: Path
) -> PartEntry:
    """Build one pipeline part into ``tmp``: an engine of the backend where it builds parts (a
    dynamic batch), else the ONNX graph itself for ONNX Runtime (FP16 graphs up-cast: its CPU
    kernels lack FP16 for several ops)."""
    onnx_file = contained(src, entry.file, f"{src / RUNTIME_FILE}: {entry.file}")
    if not onnx_file.is_file():
        raise DiffquantError(f"{onnx_file} is missing; export the model again")
    dtype, details = entry.dtype, {}
    if backend.build_part is not None:
        built = backend.build_part(onnx_file, tmp, _part_inputs(entry, runtime), settings)
        file, details = built.file, built.details
    elif entry.dtype == "float16":
        import onnx

        from diffquant.exporters.fp16 import upcast_float16  # onnx only; no torch

        file, dtype, details = entry.file, "float32", {"upcast_from": "float16"}
        onnx.save(upcast_float16(onnx.load(str(onnx_file))), str(tmp / file))
    else:
        file = entry.file
        shutil.copy2(onnx_file, tmp / file)
    return PartEntry(
        file=file,
        onnx=entry.file,
        onnx_sha256=file_sha256(onnx_file),
        runner=backend.part_runner,
        file_sha256=file_sha256(tmp / file),
        dtype=dtype,
        details=details,
    )


def _copy_side_files(src: Path, runtime: RuntimeSpec, tmp: Path) -> dict[str, str]:
    """Copy runtime.json, the conditioning and the tokenizers; their hashes by name."""
    hashes = {}
    for name in runtime.side_files(src):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(contained(src, name, f"{src / RUNTIME_FILE}: {name}"), tmp / name)
        hashes[name] = file_sha256(tmp / name)
    return hashes
