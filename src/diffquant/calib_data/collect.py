"""Collect the denoiser's named inputs along the FP sampling trajectory (the family's own
sampler and schedule) at T_c evenly spaced sampler steps.

With CFG both the conditional and unconditional copies are kept (they are what the deployed
model sees); static inputs (Flux position ids) are stored once per shard. One safetensors shard
per kept timestep plus ``index.json``; the folder name is a hash of the settings and the model's
weights, so an identical request is served from cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffquant._check import check_value, contained, read_json, typed_fields
from diffquant._digest import weights_digest
from diffquant._io import write_json
from diffquant.errors import DiffquantError
from diffquant.models.denoiser import Denoiser
from diffquant.models.inputs import NamedInputs
from diffquant.models.sampler import SamplerConfig, prompt_batch, sample

__all__ = [
    "CalibConfig",
    "CalibSet",
    "check_calib",
    "collect",
    "default_cache_dir",
    "load_calib",
    "pick_inputs",
    "pick_steps",
]

INDEX_VERSION = 2


@dataclass
class CalibConfig:
    """Calibration collection settings (papers: 20 steps x 256 samples); ``guidance`` None is
    the family's default scale (3 for the digits models)."""

    samples: int = 64
    steps: int = 25
    timesteps: int = 25
    guidance: float | None = None
    seed: int = 1234


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFQUANT_CACHE", Path.home() / ".cache" / "diffquant")) / "calib"


def pick_steps(steps: int, keep: int) -> list[int]:
    """``keep`` sampler step indices, evenly spaced over 0..steps-1 (first and last included)."""
    keep = max(1, min(keep, steps))
    if keep == 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (keep - 1)) for i in range(keep)})


@dataclass
class CalibSet:
    """A loaded calibration set: per kept step, the denoiser's named inputs. ``timesteps`` are
    the values of the ``timestep`` input (what the model and the timestep groups see)."""

    folder: Path
    config: CalibConfig
    timesteps: list[float]
    shards: dict[float, NamedInputs]

    def __len__(self) -> int:
        return sum(s.size for s in self.shards.values())

    def batches(self, batch_size: int = 256) -> Iterator[tuple[float, NamedInputs]]:
        """Yield (timestep, inputs) batches, timestep by timestep."""
        for ts in self.timesteps:
            s = self.shards[ts]
            for i in range(0, s.size, batch_size):
                yield ts, s.take(slice(i, i + batch_size))

    def at(self, timestep: float, n: int) -> NamedInputs:
        """``n`` inputs recorded at ``timestep``, spread evenly over its shard (which holds the
        conditional copies, then the unconditional ones), so both kinds are represented."""
        s = self.shards[timestep]
        count = s.size
        idx = torch.linspace(0, count - 1, min(n, count)).round().long()
        return s.take(idx)


def _settings_hash(denoiser: Denoiser, cfg: CalibConfig) -> str:
    cond = hashlib.sha256()
    for k in sorted(denoiser.conditioning):  # the encoded prompts (and their order)
        cond.update(k.encode())
        cond.update(denoiser.conditioning[k].detach().float().contiguous().numpy().tobytes())
    key = json.dumps(
        {
            "model": denoiser.name,
            "weights": weights_digest(denoiser),
            "cond": cond.hexdigest(),
            "family": denoiser.family.describe(),
            "scheduler": denoiser.scheduler,
            **asdict(cfg),
            "v": INDEX_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def collect(
    denoiser: Denoiser, cfg: CalibConfig | None = None, *, cache_dir: str | Path | None = None, progress: bool = True
) -> CalibSet:
    """Collect calibration data for ``denoiser`` (or load it from the cache)."""
    cfg = cfg or CalibConfig()
    if cfg.guidance is None:
        cfg = replace(cfg, guidance=denoiser.family.default_guidance)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"{denoiser.name.replace(':', '-').replace('/', '_')}-{_settings_hash(denoiser, cfg)}"
    if (folder / "index.json").exists():
        return load_calib(folder)
    keep = set(pick_steps(cfg.steps, cfg.timesteps))
    store: dict[int, list[NamedInputs]] = {i: [] for i in keep}

    def on_step(i: int, inputs: NamedInputs, _sl: slice) -> None:
        if i in keep:
            store[i].append(inputs.clone())

    sample(
        lambda inputs: denoiser(**inputs),
        denoiser,
        prompt_batch(denoiser, cfg.samples, cfg.seed),
        SamplerConfig(steps=cfg.steps, guidance=cfg.guidance),
        on_step=on_step,
        desc="calibrate",
        progress=progress,
    )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        shards = []
        for i in sorted(keep):
            tensors = NamedInputs.cat(store[i])
            fname = f"step{i:03d}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / fname))
            shards.append({"file": fname, "step": i, "timestep": float(tensors["timestep"][0]), "count": tensors.size})
        index = {
            "version": INDEX_VERSION,
            "model": denoiser.name,
            "config": asdict(cfg),
            "batched": sorted(denoiser.batched),
            "shards": shards,
        }
        write_json(tmp / "index.json", index)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return load_calib(folder)


def _read_index(folder: Path) -> tuple[dict, CalibConfig]:
    again = f"delete {folder} and collect again"
    if not (folder / "index.json").exists():
        raise DiffquantError(
            f"{folder} is not a calibration folder: index.json is missing; make one with `diffquant calibrate`"
        )
    index = read_json(folder / "index.json", again, required=("version", "config", "shards", "batched"))
    where = f"{folder / 'index.json'}"
    if index["version"] != INDEX_VERSION:
        raise DiffquantError(
            f"{where}: calibration index version {index['version']!r}; this diffquant reads version {INDEX_VERSION}: "
            f"{again}"
        )
    cfg = CalibConfig(**typed_fields(CalibConfig, index["config"], f"{where}: config"))
    check_value(index["batched"], list[str], f"{where}: batched")
    for i, e in enumerate(check_value(index["shards"], list[dict], f"{where}: shards")):
        contained(folder, e.get("file"), f"{where}: shards[{i}].file")
        check_value(e.get("timestep"), float, f"{where}: shards[{i}].timestep")
        check_value(e.get("count"), int, f"{where}: shards[{i}].count")
    if not index["shards"]:
        raise DiffquantError(f"{where}: shards: the list is empty; {again}")
    return index, cfg


def _check_shard(path: Path, tensors: dict, entry: dict, first: dict | None, batched: set[str], again: str) -> None:
    """A shard's tensors: finite, the keys and per-sample shapes of the first shard, ``count``
    rows in every batched input, and the timestep the index names."""
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise DiffquantError(
                f"calibration shard {path} (timestep {entry['timestep']:g}) has {bad} NaN/Inf values in {k!r}; "
                f"the FP model diverged or the file is damaged: {again}"
            )
        if k in batched and (v.ndim == 0 or len(v) != entry["count"]):
            raise DiffquantError(
                f"calibration shard {path}: {k!r} has shape {list(v.shape)}, the index says {entry['count']} rows; "
                f"{again}"
            )
    if "timestep" not in tensors or not torch.all(
        tensors["timestep"].float() == float(tensors["timestep"].reshape(-1)[0])
    ):
        raise DiffquantError(f"calibration shard {path}: 'timestep' is missing or not one value per shard; {again}")
    if first is not None:
        if set(tensors) != set(first):
            raise DiffquantError(
                f"calibration shard {path} holds {sorted(tensors)}, the first shard {sorted(first)}; {again}"
            )
        for k, v in tensors.items():
            if k in batched and v.shape[1:] != first[k].shape[1:]:
                raise DiffquantError(
                    f"calibration shard {path}: {k!r} has per-sample shape {list(v.shape[1:])}, "
                    f"the first shard {list(first[k].shape[1:])}; {again}"
                )


def load_calib(folder: str | Path) -> CalibSet:
    """Load a calibration folder written by `collect`, checking the index against its schema and
    every shard for keys, shapes, dtype and NaN/Inf before any of it is used."""
    folder = Path(folder)
    index, cfg = _read_index(folder)
    again = f"delete {folder} and collect again"
    batched = set(index["batched"])
    shards: dict[float, NamedInputs] = {}
    first = None
    for e in index["shards"]:
        path = folder / e["file"]
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise DiffquantError(f"calibration shard {path} is unreadable ({err}); {again}") from None
        _check_shard(path, tensors, e, first, batched, again)
        first = first or tensors
        shards[float(e["timestep"])] = NamedInputs(tensors, batched)
    return CalibSet(folder=folder, config=cfg, timesteps=list(shards), shards=shards)


def check_calib(calib: CalibSet, denoiser: Denoiser) -> None:
    """Refuse calibration data recorded for another model: the input names and per-sample shapes
    must be the denoiser's own (what `quantize` would otherwise train on silently)."""
    ex = denoiser.example_inputs(1)
    got = next(iter(calib.shards.values())) if calib.shards else {}
    where = f"calibration folder {calib.folder}" if calib.folder else "calibration data"
    missing = sorted(set(ex) - set(got))
    if missing:
        raise DiffquantError(
            f"{where} lacks the input(s) {missing} that {denoiser.name} takes; collect it for this model with "
            "`diffquant calibrate`"
        )
    for k, v in ex.items():
        if k in ex.batched and tuple(got[k].shape[1:]) != tuple(v.shape[1:]):
            raise DiffquantError(
                f"{where}: {k!r} has per-sample shape {list(got[k].shape[1:])}, {denoiser.name} takes "
                f"{list(v.shape[1:])}; collect it for this model (and resolution) with `diffquant calibrate`"
            )


def pick_inputs(
    calib: CalibSet, n_timesteps: int, n_samples: int, group_of=None, n_groups: int = 1
) -> list[tuple[float, NamedInputs]]:
    """Recorded (timestep, inputs) at about ``n_timesteps`` evenly spaced calibration
    timesteps, at least one in each of ``n_groups`` timestep groups (``group_of(t)`` -> index)."""
    group_of = group_of or (lambda t: 0)
    inputs = []
    per = max(1, -(-n_timesteps // n_groups))
    for g in range(n_groups):
        ts = [t for t in calib.timesteps if group_of(t) == g]
        inputs += [(ts[i], calib.at(ts[i], n_samples)) for i in pick_steps(len(ts), min(per, len(ts)))]
    return inputs
