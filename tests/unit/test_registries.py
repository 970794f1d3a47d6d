"""The extension points say what they cost (docs/ARCHITECTURE.md): a backend is one `Backend` in
the registry, and `build`, the loader, the CLI's `--backend` and its options follow; a pass's
report hook is run for the passes a plan ran, by a job that names no pass."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from diffquant.artifacts import RuntimeSpec
from diffquant.cli import main
from diffquant.engines import BACKENDS, BuildConfig, EnginesFromFolder, OrtEngine, build
from diffquant.engines.base import Backend, Built
from diffquant.exporters import export
from diffquant.passes import load_recipe, quantize
from diffquant.passes.registry import REPORT_HOOKS, write_pass_reports
from tests.conftest import make_tiny_dit, tiny_calib


@dataclass
class CopySettings:
    stamp: str = field(default="none", metadata={"help": "a word recorded with every engine"})


def _copy(onnx_file: Path, out_dir: Path, inputs: list, settings: CopySettings) -> Built:
    shutil.copy2(onnx_file, out_dir / onnx_file.name)
    return Built(onnx_file.name, onnx_file.name, {"stamp": settings.stamp, "inputs": [i.name for i in inputs]})


def _open(path: Path, entry, manifest, threads: int) -> OrtEngine:
    return OrtEngine(path, threads=threads)


COPY = Backend(
    name="copy",
    summary="the ONNX graphs as exported, run by ONNX Runtime with plain Q/DQ semantics",
    settings=CopySettings,
    require=lambda: None,
    build=_copy,
    load=_open,
    describe=lambda d: f"stamped {d['stamp']}",
)


@pytest.fixture(scope="module")
def exported(calib_cache, tmp_path_factory):
    d = make_tiny_dit()
    plan = quantize(d, load_recipe("minmax"), tiny_calib(d, calib_cache), bits="w8a8", progress=False)
    out = tmp_path_factory.mktemp("reg") / "exp"
    export(plan, d, out, target="tensorrt")
    return d, tiny_calib(d, calib_cache), out


def test_a_registered_backend_builds_loads_and_is_offered(exported, tmp_path, capsys, monkeypatch):
    d, calib, exp = exported
    monkeypatch.setitem(BACKENDS, "copy", COPY)
    out = build(exp, tmp_path / "api", BuildConfig(backend="copy", options={"stamp": "api", "batch": 3}))
    meta = json.loads((out / "engine.json").read_text())
    assert meta["backend"] == "copy"
    assert meta["config"]["settings"] == {"stamp": "api"}  # the options other backends take are ignored
    names = [i.name for i in RuntimeSpec.read(exp).inputs]
    assert meta["engines"][0]["stamp"] == "api" and meta["engines"][0]["inputs"] == names
    feeds = calib.at(calib.timesteps[0], 2).numpy()
    engine, _ = EnginesFromFolder(out)
    with engine, OrtEngine(exp / "unet.qdq.onnx") as ref:
        np.testing.assert_array_equal(engine.run(feeds)["noise_pred"], ref.run(feeds)["noise_pred"])
    # the command offers it, with an option made from its settings' field, and describes what it built
    assert main(["build", str(exp), "--backend", "copy", "--stamp", "cli", "--out", str(tmp_path / "cli")]) == 0
    assert "stamped cli" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert "copy options" in capsys.readouterr().out


def test_report_hooks_run_for_the_passes_the_plan_ran(exported, tmp_path, monkeypatch):
    d, calib, _ = exported
    seen = []

    def hook(plan, folder: Path) -> list[Path]:
        seen.append(plan.recipe["name"])
        (folder / "minmax.md").write_text("ranges")
        return [folder / "minmax.md"]

    monkeypatch.setitem(REPORT_HOOKS, "minmax", hook)
    plan = quantize(d, load_recipe("minmax"), calib, bits="w8a8", progress=False)
    assert write_pass_reports(plan, tmp_path) == [tmp_path / "minmax.md"] and seen == ["minmax"]
    plan = quantize(d, load_recipe("modelopt-int8"), calib, progress=False)  # smoothquant -> minmax: minmax ran
    assert write_pass_reports(plan, tmp_path) == [tmp_path / "minmax.md"]
    monkeypatch.delitem(REPORT_HOOKS, "minmax")
    assert write_pass_reports(plan, tmp_path) == []
