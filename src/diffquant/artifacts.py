"""Everything diffquant writes to disk and reads back, as typed records: the file names, the
runtime spec (``runtime.json``: what a torch-free runtime needs to sample), the engine manifest
(``engine.json``: every file of an engine folder with its hash) and the run report
(``report.json``). Written and read only here; reading checks the schema (every field's type,
nested records too), the version, that every file named stays inside its folder, and hashes.

Torch-free: engine folders are read on edge devices with only numpy and a runtime installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from diffquant._check import check_value, contained, read_json
from diffquant._io import write_json
from diffquant.errors import DiffquantError

__all__ = [
    "CONDITIONING_FILE",
    "ENGINE_FILE",
    "FP_GRAPH",
    "PARTS_FILE",
    "REALIZED_FILE",
    "REPORT_FILE",
    "RUNTIME_FILE",
    "ConditioningEntry",
    "EngineEntry",
    "EngineManifest",
    "GraphEntry",
    "InputEntry",
    "PartEntry",
    "Record",
    "RunReport",
    "RuntimeSpec",
    "SamplerEntry",
    "TextEncoderEntry",
    "TextEntry",
    "VaeEntry",
    "file_sha256",
    "graph_file",
]

RUNTIME_FILE = "runtime.json"
ENGINE_FILE = "engine.json"
REPORT_FILE = "report.json"
CONDITIONING_FILE = "conditioning.safetensors"
PARTS_FILE = "parts.json"
REALIZED_FILE = "realized.json"
FP_GRAPH = "unet.fp32.onnx"


def graph_file(group: int, n_groups: int) -> str:
    """File name of a timestep group's Q/DQ graph (``unet.qdq.onnx`` when there is one group)."""
    return "unet.qdq.onnx" if n_groups == 1 else f"unet.qdq.g{group}.onnx"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_type(tp: Any) -> tuple[str, type | None]:
    """How a field holds records: ("one" | "optional" | "list" | "dict", the record class), or ("", None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, Record):
        return "one", tp
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        kind, cls = _record_type(inner[0]) if len(inner) == 1 else ("", None)
        return ("optional" if kind == "one" else f"optional-{kind}" if kind else ""), cls
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], Record):
        return "list", args[0]
    if origin is dict and len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], Record):
        return "dict", args[1]
    return "", None


class Record:
    """A JSON object as a dataclass. `from_json` checks every field against its annotation (a
    missing key without a default, or a value of the wrong type, is one error naming the file and
    the key) and builds nested records; `to_json` writes the fields in order, leaving out optional
    ones that are None. ``EXTRA`` names a dict field that keeps the keys the schema does not list
    (a backend's own build details), written back flat."""

    EXTRA: ClassVar[str] = ""

    @classmethod
    def from_json(cls, data: Any, where: str, hint: str = "") -> Any:
        data = check_value(data, dict, where, hint)
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == cls.EXTRA:
                continue
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise DiffquantError(f"{where}: missing key {f.name!r}" + (f"; {hint}" if hint else ""))
                continue
            values[f.name] = _read_field(data[f.name], hints[f.name], _at(where, f.name), hint)
        if cls.EXTRA:
            values[cls.EXTRA] = {k: v for k, v in data.items() if k not in values and k not in _field_names(cls)}
        return cls(**values)

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.name == self.EXTRA:
                out.update(v)
            elif v is not None or f.default is not None:
                out[f.name] = _write_field(v)
        return out


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _at(where: str, key: str) -> str:
    """Where a key lies: ``FILE: key`` at the top, ``FILE: outer.key`` below."""
    return f"{where}.{key}" if ": " in where else f"{where}: {key}"


def _read_field(value: Any, tp: Any, where: str, hint: str) -> Any:
    kind, cls = _record_type(tp)
    if value is None and kind.startswith("optional"):
        return None
    if cls is None:
        return check_value(value, tp, where, hint)
    if kind.endswith("list"):
        return [cls.from_json(v, f"{where}[{i}]", hint) for i, v in enumerate(check_value(value, list, where, hint))]
    if kind.endswith("dict"):
        return {k: cls.from_json(v, _at(where, k), hint) for k, v in check_value(value, dict, where, hint).items()}
    return cls.from_json(value, where, hint)


def _write_field(v: Any) -> Any:
    if isinstance(v, Record):
        return v.to_json()
    if isinstance(v, list):
        return [_write_field(x) for x in v]
    if isinstance(v, dict):
        return {k: _write_field(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------- runtime.json


@dataclass
class InputEntry(Record):
    """One named input of the denoiser graphs: dtype, shape (``"batch"`` and other names mark
    dynamic axes), its role in a sampling step, and an example shape."""

    name: str
    dtype: str
    shape: list[int | str]
    role: str = "cond"
    example: list[int] = field(default_factory=list)


@dataclass
class ConditioningEntry(Record):
    """The exported prompt table: its file, the calibrated prompts (row i), the null row's id
    (negative / unconditional, last), and the separator of several prompts on a command line."""

    file: str
    prompts: list[str]
    null_id: int
    separator: str = ""


@dataclass
class SamplerEntry(Record):
    """How the family samples: ``kind`` (ddim / flow), guidance mode (cfg / embedded / none) and
    default scale, the factor a scheduler timestep is fed with, and flow matching's sigmas / mu."""

    kind: str = "ddim"
    guidance: str = "cfg"
    default_guidance: float = 3.0
    timestep_scale: float = 1.0
    flow_sigmas: str = "scheduler"
    mu: float | None = None


@dataclass
class GraphEntry(Record):
    """One denoiser graph and the timesteps it serves (empty: all)."""

    file: str
    timestep_range: list[float] = field(default_factory=list)


@dataclass
class TextEncoderEntry(Record):
    """One exported text encoder: pipeline component and tokenizer, padded length, outputs read
    by the composition, whether the mask is fed and prompts lower-cased, and its files."""

    component: str
    tokenizer: str
    max_length: int
    outputs: list[str]
    feed_mask: bool
    lowercase: bool
    file: str
    tokenizer_file: str
    dtype: str = "float32"


@dataclass
class TextEntry(Record):
    """The pipeline's text side: its encoders, one composition expression per conditioning input
    (`engines.text.compose`), and the unconditional row without a negative prompt."""

    encoders: list[TextEncoderEntry]
    compose: dict[str, list]
    unset_negative: str = "empty"


@dataclass
class VaeEntry(Record):
    """An exported VAE graph (decoder: latents -> images in [-1, 1]; encoder: the reverse)."""

    file: str
    input: str
    output: str
    dtype: str
    shape: list[int]


RUNTIME_VERSION = 2


@dataclass
class RuntimeSpec(Record):
    """``runtime.json``: what `generate` needs without torch (see `exporters.writer`)."""

    version: int
    model: str
    family: str
    target: str
    bits: str
    sample_shape: list[int]
    latent: bool
    inputs: list[InputEntry]
    output: str
    conditioning: ConditioningEntry
    sampler: SamplerEntry
    scheduler: dict
    graphs: list[GraphEntry]
    resolution: list[int]
    text: TextEntry | None = None
    vae: dict[str, VaeEntry] | None = None

    @classmethod
    def read(cls, folder: str | Path, hint: str = "export the model again") -> RuntimeSpec:
        """``folder/runtime.json``, schema-checked, every file it names inside ``folder``."""
        path = Path(folder) / RUNTIME_FILE
        data = read_json(path, hint, required=("inputs",))
        version = data.get("version", 1)
        if version != RUNTIME_VERSION:
            raise DiffquantError(
                f"{path}: version {version!r}: this engine or export folder was made by "
                f"{'an older' if isinstance(version, int) and version < RUNTIME_VERSION else 'another'} diffquant "
                f"(this one reads version {RUNTIME_VERSION}); export and build it again"
            )
        spec = cls.from_json(data, str(path), hint)
        for key, name in spec.files().items():
            contained(folder, name, f"{path}: {key}")
        return spec

    def write(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / RUNTIME_FILE, self.to_json())

    def files(self) -> dict[str, str]:
        """Every file this spec names, by its key: graphs, the conditioning, parts and tokenizers."""
        out = {f"graphs[{i}].file": g.file for i, g in enumerate(self.graphs)}
        out["conditioning.file"] = self.conditioning.file
        for i, e in enumerate(self.text.encoders if self.text else []):
            out.update({f"text.encoders[{i}].file": e.file, f"text.encoders[{i}].tokenizer_file": e.tokenizer_file})
        out.update({f"vae.{k}.file": v.file for k, v in (self.vae or {}).items()})
        return out

    def part_graphs(self) -> dict[str, TextEncoderEntry | VaeEntry]:
        """Name -> entry of every exported part graph (text encoders by component, ``vae_decoder``)."""
        parts: dict[str, TextEncoderEntry | VaeEntry] = (
            {e.component: e for e in self.text.encoders} if self.text else {}
        )
        parts.update({f"vae_{k}": v for k, v in (self.vae or {}).items()})
        return parts

    def tokenizer_files(self) -> list[str]:
        return [e.tokenizer_file for e in self.text.encoders] if self.text else []

    def side_files(self, folder: str | Path) -> list[str]:
        """The files an engine folder carries beside its engines, each hashed in engine.json:
        runtime.json, the conditioning (where the export wrote one) and the tokenizers."""
        cond = [self.conditioning.file] if (Path(folder) / self.conditioning.file).is_file() else []
        return [RUNTIME_FILE, *cond, *self.tokenizer_files()]

    def input(self, name: str) -> InputEntry:
        return next(i for i in self.inputs if i.name == name)


# ---------------------------------------------------------------- engine.json

ENGINE_VERSION = 2  # 2: engine.json records the hashes of runtime.json and the conditioning


@dataclass
class EngineEntry(Record):
    """One built denoiser engine: its file and hash, the graph it was built from (and that
    graph's hash), the timesteps it serves, the plan's weight digest; ``details`` holds the
    backend's own build facts (TensorRT version and GPU, OpenVINO device, ORT weight modes)."""

    EXTRA: ClassVar[str] = "details"
    file: str
    onnx: str
    onnx_sha256: str
    timestep_range: list[float]
    plan_model_digest: str = ""
    file_sha256: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class PartEntry(Record):
    """One built pipeline part (text encoder, VAE): its file, hash, float type, what runs it, and
    the graph it came from."""

    EXTRA: ClassVar[str] = "details"
    file: str
    onnx: str
    onnx_sha256: str
    runner: str
    file_sha256: str
    dtype: str = "float32"
    details: dict = field(default_factory=dict)


@dataclass
class EngineManifest(Record):
    """``engine.json``: the backend, the build settings and machine, every engine and part with its
    hash, and the hashes of the side files (runtime.json, the conditioning, the tokenizers)."""

    version: int
    backend: str
    built: str = ""
    config: dict = field(default_factory=dict)
    cpu: dict | None = None
    engines: list[EngineEntry] = field(default_factory=list)
    parts: dict[str, PartEntry] = field(default_factory=dict)
    files_sha256: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def read(cls, folder: str | Path, backends: typing.Iterable[str]) -> EngineManifest:
        """``folder/engine.json`` checked against its schema (version, a known backend, one entry
        per engine naming a file inside the folder) and the side files against their hashes."""
        folder = Path(folder)
        path, again = folder / ENGINE_FILE, "build the engine folder again with `diffquant build`"
        if not path.exists():
            raise DiffquantError(
                f"{folder} is not an engine folder (no {ENGINE_FILE}); make one with `diffquant build`"
            )
        data = read_json(path, again, required=("version", "backend", "engines"))
        if data["version"] != ENGINE_VERSION:
            raise DiffquantError(
                f"{path}: engine folder version {data['version']!r}; this diffquant reads version {ENGINE_VERSION}: "
                f"{again}"
            )
        check_value(data["backend"], typing.Literal[tuple(backends)], f"{path}: backend", again)
        meta = cls.from_json(data, str(path), again)
        if not meta.engines:
            raise DiffquantError(f"{path}: engines: the list is empty; {again}")
        for i, e in enumerate(meta.engines):
            contained(folder, e.file, f"{path}: engines[{i}].file")
        for name, part in meta.parts.items():
            contained(folder, part.file, f"{path}: parts.{name}.file")
        for name, digest in meta.files_sha256.items():
            side = contained(folder, name, f"{path}: files_sha256")
            if not side.is_file() or file_sha256(side) != digest:
                why = "is missing" if not side.is_file() else "changed since the folder was built (hash mismatch)"
                raise DiffquantError(f"{side} {why}; {again}")
        return meta

    def write(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / ENGINE_FILE, self.to_json())

    @property
    def plan_model_digest(self) -> str:
        return next((e.plan_model_digest for e in self.engines if e.plan_model_digest), "")


# ---------------------------------------------------------------- report.json


@dataclass
class RunReport(Record):
    """``report.json`` of a `diffquant run`: what was run (model, recipe, bits, target, settings),
    where its files are, parity and the ladder, quality and noise fidelity, timings, what the
    lowering realized, the plan's bits and pass reports, the linter's counts, and the files the
    passes' report hooks wrote."""

    model: str
    family: dict = field(default_factory=dict)
    recipe: str = ""
    bits: str = ""
    target: str = "tensorrt"
    reduce_range: bool = False
    cpu: dict = field(default_factory=dict)
    onnx: str = ""
    graphs: list[str] = field(default_factory=list)
    timestep_groups: list[list[float]] = field(default_factory=list)
    deployed_qdq_fusion: bool = False
    fp_onnx: str = ""
    plan: str = ""
    parity: dict = field(default_factory=dict)
    ladder: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    noise_fidelity: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    realized: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    plan_bits: dict = field(default_factory=dict)
    pass_reports: list[dict] = field(default_factory=list)
    lint: dict = field(default_factory=dict)
    pass_files: list[str] = field(default_factory=list)

    # what `validate` needs of the settings to record the inputs again
    SETTINGS: ClassVar[dict[str, Any]] = {
        "calib_samples": int,
        "steps": int,
        "calib_timesteps": int,
        "guidance": float | None,
        "prompts": str,
    }

    @classmethod
    def read(cls, folder: str | Path) -> RunReport:
        """``folder/report.json`` of a run folder, schema-checked."""
        folder = Path(folder)
        path, again = folder / REPORT_FILE, "make the run folder again with `diffquant run`"
        if not path.exists():
            raise DiffquantError(f"{folder} is not a run folder (no {REPORT_FILE}); make one with `diffquant run`")
        return cls.from_json(read_json(path, again, required=("model", "settings", "onnx")), str(path), again)

    def recorded_settings(self, folder: str | Path) -> dict:
        """The run's settings, with every key `validate` needs to record its inputs again."""
        path, again = Path(folder) / REPORT_FILE, "make the run folder again with `diffquant run`"
        for key, tp in self.SETTINGS.items():
            if key not in self.settings:
                raise DiffquantError(f"{path}: settings lacks {key!r}; {again}")
            check_value(self.settings[key], tp, f"{path}: settings.{key}")
        return self.settings

    def write(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / REPORT_FILE, self.to_json())

    def graph_files(self, folder: str | Path) -> list[Path]:
        """The run's Q/DQ graphs inside ``folder`` (one per timestep group)."""
        return [contained(folder, Path(p).name, f"{Path(folder) / REPORT_FILE}: graphs") for p in self.graphs]
