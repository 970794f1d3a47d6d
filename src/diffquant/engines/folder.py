"""Loading a built engine folder, torch-free: `EnginesFromFolder` gives the denoiser engines of
every timestep group as one `GroupedEngine` with the folder's runtime spec, `load_parts` the
text encoders and the VAE. Before anything runs, engine.json is checked (its schema, every file
inside the folder, the hash of every engine, part and side file) and every engine opens with the
backend that built it (`engines.backends`)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from diffquant._check import contained
from diffquant._groups import group_index
from diffquant.artifacts import ENGINE_FILE, EngineEntry, EngineManifest, PartEntry, RuntimeSpec, file_sha256
from diffquant.engines.backends import BACKENDS, get_backend
from diffquant.engines.base import Engine
from diffquant.errors import DiffquantError

__all__ = ["EnginesFromFolder", "GroupedEngine", "load_parts", "open_denoiser", "read_folder"]

AGAIN = "build the folder again with `diffquant build`"


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


def read_folder(folder: str | Path) -> tuple[EngineManifest, RuntimeSpec]:
    """engine.json and runtime.json of a built folder, checked; every side file must be hashed."""
    manifest = EngineManifest.read(folder, BACKENDS)
    runtime = RuntimeSpec.read(folder, "the engine folder is incomplete; build it again")
    missing = [n for n in runtime.side_files(folder) if n not in manifest.files_sha256]
    if missing:
        raise DiffquantError(f"{Path(folder) / ENGINE_FILE}: {missing} carry no recorded hash; {AGAIN}")
    return manifest, runtime


def _open(folder: Path, entry: EngineEntry | PartEntry, manifest: EngineManifest, runner: str, threads: int) -> Engine:
    """One built engine or part, hash-checked, opened by the backend that runs it."""
    backend = get_backend(runner)
    path = contained(folder, entry.file, f"{folder / ENGINE_FILE}: file")
    if not path.is_file():
        raise DiffquantError(f"engine file {path} is missing; {AGAIN}")
    checked = backend.hashed_file(path)
    if not entry.file_sha256:
        raise DiffquantError(f"{folder / ENGINE_FILE}: {entry.file} carries no recorded hash; {AGAIN}")
    if not checked.is_file() or file_sha256(checked) != entry.file_sha256:
        raise DiffquantError(f"{checked} changed since it was built (hash mismatch); {AGAIN}")
    return backend.load(path, entry, manifest, threads)


def EnginesFromFolder(folder: str | Path, threads: int = 0) -> tuple[GroupedEngine, RuntimeSpec]:  # noqa: N802
    """Loader: the engines of a built folder as one `GroupedEngine`, plus its runtime spec.
    Checks engine.json's schema, that every file it names lies inside the folder and still has
    the hash it was built with (engines, runtime.json, conditioning, tokenizers)."""
    manifest, runtime = read_folder(folder)
    return open_denoiser(folder, manifest, threads), runtime


def open_denoiser(folder: str | Path, manifest: EngineManifest, threads: int = 0) -> GroupedEngine:
    """The denoiser engines of a checked folder, one per timestep group, as one engine."""
    folder = Path(folder)
    with ExitStack() as opened:  # an engine that fails to load closes the ones loaded before it
        engines = []
        for e in manifest.engines:
            engines.append(_open(folder, e, manifest, manifest.backend, threads))
            opened.callback(engines[-1].close)
        opened.pop_all()
    return GroupedEngine(engines, [e.timestep_range for e in manifest.engines])


def load_parts(folder: str | Path, manifest: EngineManifest, threads: int = 0) -> dict[str, Engine]:
    """The pipeline parts of a built folder (text encoders by component, ``vae_decoder``), each
    hash-checked and opened by the backend that runs it."""
    folder = Path(folder)
    parts: dict[str, Engine] = {}
    with ExitStack() as opened:
        for name, entry in manifest.parts.items():
            parts[name] = _open(folder, entry, manifest, entry.runner, threads)
            opened.callback(parts[name].close)
        opened.pop_all()
    return parts
