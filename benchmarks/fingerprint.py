"""Fingerprints of the builtin models' plans and deployed graphs, to prove a refactor kept behaviour.

For each (model, recipe, bits) this quantizes with small, fixed settings (the recipes' passes all
run, with their iterations cut), exports both targets, and records a sha256 of every plan tensor
and every graph initializer. Run it on two commits and compare the JSON files:

    python benchmarks/fingerprint.py --out /tmp/before.json        # on the old commit
    python benchmarks/fingerprint.py --out /tmp/after.json --compare /tmp/before.json

Node and input names may differ between the two, and so may the plan's file keys; the plan's tensor
values (compared as a multiset) and the graph initializers (by name) may not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import numpy_helper

from diffquant.calib_data import CalibConfig, collect
from diffquant.exporters import export
from diffquant.models.loading import load_denoiser

try:  # the passes' home since the walls moved (issue 27); `pipeline` before
    from diffquant.passes import load_recipe, quantize
except ImportError:
    from diffquant.pipeline import load_recipe, quantize
try:
    from diffquant.engines.build import BuildConfig, build
except ImportError:
    from diffquant.engines.bundle import BuildConfig, build

CASES = [
    ("builtin:digits-sd", "minmax", "w8a8", {}),
    ("builtin:digits-dit", "minmax", "w8a8", {}),
    ("builtin:digits-sd", "modelopt-int8", "w8a8", {}),
    ("builtin:digits-dit", "modelopt-int8", "w8a8", {}),
    ("builtin:digits-sd", "qdiffusion", "w4a8", {"reconstruct": {"iters": 10, "samples": 64}}),
    ("builtin:digits-dit", "qdiffusion", "w4a8", {"reconstruct": {"iters": 10, "samples": 64}}),
    (
        "builtin:digits-sd",
        "dmq",
        "w4a8",
        {"les": {"iters": 5, "samples": 32}, "reconstruct": {"iters": 5, "samples": 32}, "pts": {"samples": 64}},
    ),
    (
        "builtin:digits-dit",
        "dmq",
        "w4a8",
        {"les": {"iters": 5, "samples": 32}, "reconstruct": {"iters": 5, "samples": 32}, "pts": {"samples": 64}},
    ),
    # the sub-8-bit activation path (Clip before Q, narrowed U8 range, LSQ steps on a 6-bit grid)
    ("builtin:digits-sd", "qdiffusion", "w4a6", {"reconstruct": {"iters": 10, "samples": 64}}),
    ("builtin:digits-dit", "minmax", "w4a6", {}),
    # every other recipe, iterations cut: TCR + PAR + DAQ operand sites, the searched bit widths,
    # LoRA distillation with TALSQ groups (4 graphs), OMQ's per-channel bit vectors with TRD
    (
        "builtin:digits-sd",
        "tcaq",
        "w4a8",
        {"reconstruct": {"iters": 5, "samples": 32, "par_rounds": 1}, "daq": {"samples": 2000}},
    ),
    (
        "builtin:digits-dit",
        "tcaq",
        "w4a6",
        {"reconstruct": {"iters": 5, "samples": 32, "par_rounds": 1}, "daq": {"samples": 2000}},
    ),
    ("builtin:digits-sd", "qua2sedimo", "w4a8", {"qua2sedimo": {"configs": 12, "holdout": 4, "score": "noise"}}),
    (
        "builtin:digits-dit",
        "qua2sedimo",
        "w4a8",
        {"qua2sedimo": {"configs": 10, "holdout": 3, "score": "samples", "probe_samples": 2}},
    ),
    ("builtin:digits-sd", "efficientdm", "w2a4", {"efficientdm": {"iters": 3, "steps": 3, "batch_size": 2}}),
    (
        "builtin:digits-dit",
        "mpqdm",
        "w2a4",
        {"omq": {"samples": 32}, "efficientdm": {"iters": 4, "steps": 4, "batch_size": 2}},
    ),
]
# the deployed text-to-image pipeline: runtime.json, the prompt table, the parts and engine.json
PIPELINE_CASES = [
    ("builtin:digits-ldm", "minmax", "w8a8", "onnxruntime"),
    ("builtin:digits-ldm", "minmax", "w8a8", "tensorrt"),
]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _plan_tensors(plan) -> dict:
    """The plan's tensors by file key (plans before the typed-site refactor held a dict)."""
    t = plan.tensors
    return t() if callable(t) else t


def fingerprint(cache: str, cases: list = CASES, pipelines: list = PIPELINE_CASES) -> dict:
    out: dict = {}
    for model, recipe, bits, overrides in cases:
        d = load_denoiser(model)
        calib = collect(d, CalibConfig(samples=8, steps=10, timesteps=5), cache_dir=cache, progress=False)
        plan = quantize(d, load_recipe(recipe, overrides), calib, bits=bits, progress=False)
        entry = {
            "plan": {
                k: _sha(v.detach().float().contiguous().numpy().tobytes())
                for k, v in sorted(_plan_tensors(plan).items())
            }
        }
        for target in ("tensorrt", "onnxruntime"):
            with tempfile.TemporaryDirectory() as tmp:
                res = export(plan, d, tmp, target=target)
                g = onnx.load(str(res.qdq_onnx))
                entry[target] = {
                    i.name: _sha(numpy_helper.to_array(i).tobytes())
                    for i in g.graph.initializer
                    if "quantized" in i.name
                    or "scale" in i.name
                    or "zero_point" in i.name
                    or "folded" in i.name
                    or "smooth" in i.name
                    or "clip" in i.name
                }
        out[f"{model} {recipe} {bits}"] = entry
        print(
            f"{model} {recipe} {bits}: {len(entry['plan'])} plan tensors, {len(entry['tensorrt'])} / "
            f"{len(entry['onnxruntime'])} Q/DQ initializers",
            flush=True,
        )
    for model, recipe, bits, target in pipelines:
        out[f"{model} {recipe} {bits} {target} folders"] = entry = _folders(model, recipe, bits, target, cache)
        print(f"{model} {recipe} {bits} {target}: {len(entry['files'])} export and engine files", flush=True)
    return out


def _json_shas(path: Path, key: str, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """Hashes of a JSON file's top-level values, one per key (keys sorted inside), so a changed
    section is named on its own; machine- and time-dependent keys dropped."""
    d = json.loads(path.read_text())
    return {f"{key}:{k}": _sha(json.dumps(v, sort_keys=True).encode()) for k, v in d.items() if k not in drop}


def _folders(model: str, recipe: str, bits: str, target: str, cache: str) -> dict:
    """An export folder and the engine folder built from it (ONNX Runtime): each JSON file by
    content, each ONNX graph by its initializers, every other file by its bytes."""
    d = load_denoiser(model)
    calib = collect(d, CalibConfig(samples=8, steps=10, timesteps=5), cache_dir=cache, progress=False)
    plan = quantize(d, load_recipe(recipe, {}), calib, bits=bits, progress=False)
    files: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        export(plan, d, Path(tmp) / "export", target=target)
        build(Path(tmp) / "export", Path(tmp) / "engine", BuildConfig(backend="onnxruntime"))
        for folder in ("export", "engine"):
            root = Path(tmp) / folder
            for f in sorted(p for p in root.rglob("*") if p.is_file()):
                key = f"{folder}/{f.relative_to(root)}"
                if f.suffix == ".json":
                    # machine, time and path dependent: the build time, the source folder, the CPU
                    files.update(_json_shas(f, key, drop=("built", "source", "cpu")))
                elif f.suffix == ".onnx":
                    g = onnx.load(str(f))
                    files[key] = _sha(
                        "".join(
                            sorted(i.name + _sha(numpy_helper.to_array(i).tobytes()) for i in g.graph.initializer)
                        ).encode()
                    )
                else:
                    files[key] = _sha(f.read_bytes())
    return {"files": files}


def _meta() -> dict:
    """What the fingerprint ran on: the commit (and whether the tree had changes) and versions."""
    import subprocess

    import onnxruntime
    import torch

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "src")), **versions}


def compare(a: dict, b: dict, only: str | None = None) -> list[str]:
    """Graph initializers must match by name and value; plan tensors by value only (as a
    multiset), because the plan's file keys may be renamed by a refactor; files of the
    export and engine folders by name and content."""
    diffs = []
    for case in sorted(c for c in set(a) | set(b) if (not only or only in c) and not c.startswith("_")):
        for part in ("plan", "tensorrt", "onnxruntime", "files"):
            x, y = a.get(case, {}).get(part, {}), b.get(case, {}).get(part, {})
            if part == "plan":
                if sorted(x.values()) != sorted(y.values()):
                    diffs.append(
                        f"{case} plan: tensor values differ ({len(x)} vs {len(y)} tensors, "
                        f"{len(set(x.values()) ^ set(y.values()))} values in one only)"
                    )
                continue
            bad = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            if bad:
                diffs.append(f"{case} {part}: {len(bad)} differ, e.g. {bad[:3]}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--compare", default=None, help="an earlier fingerprint JSON to compare with")
    ap.add_argument("--cache", default=None, help="calibration cache folder (default: a temp folder)")
    ap.add_argument("--only", default=None, help="run (and compare) only the cases whose name contains this, e.g. tcaq")
    a = ap.parse_args()
    only = a.only or ""
    cases = [c for c in CASES if only in " ".join(c[:3])]
    pipelines = [c for c in PIPELINE_CASES if only in " ".join(c)]
    with tempfile.TemporaryDirectory() as tmp:
        fp = fingerprint(a.cache or tmp, cases, pipelines)
    fp["_meta"] = _meta()
    Path(a.out).write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
    if a.compare:
        diffs = compare(json.loads(Path(a.compare).read_text()), fp, a.only)
        for d in diffs:
            print("DIFF", d)
        n = sum(1 for k in fp if not k.startswith("_"))
        print(f"{n} cases compared: {'identical' if not diffs else f'{len(diffs)} parts differ'}")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
