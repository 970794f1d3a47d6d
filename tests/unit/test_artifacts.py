"""The typed files: what `export` and `build` write reads back into the same records and writes
back to the same bytes (engine.json hashes runtime.json's bytes), and a wrong field is one error
naming the file and the key."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from diffquant.artifacts import (
    ENGINE_FILE,
    RUNTIME_FILE,
    EngineEntry,
    EngineManifest,
    RunReport,
    RuntimeSpec,
    file_sha256,
)
from diffquant.engines import BACKENDS, BuildConfig, build
from diffquant.errors import DiffquantError
from diffquant.exporters import export
from diffquant.passes import load_recipe, quantize
from tests.conftest import make_tiny_unet, tiny_calib


@pytest.fixture(scope="module")
def folders(calib_cache, tmp_path_factory):
    """A tiny model exported (two timestep groups) and built for ONNX Runtime."""
    root = tmp_path_factory.mktemp("artifacts")
    d = make_tiny_unet()
    plan = quantize(
        d, load_recipe("minmax"), tiny_calib(d, calib_cache), bits="w8a8", progress=False, timestep_groups=2
    )
    export(plan, d, root / "exp", target="onnxruntime")
    build(root / "exp", root / "eng", BuildConfig(backend="onnxruntime"))
    return root / "exp", root / "eng"


def test_runtime_spec_reads_back_and_writes_the_same_bytes(folders, tmp_path):
    exp, _ = folders
    spec = RuntimeSpec.read(exp)
    assert [g.file for g in spec.graphs] == ["unet.qdq.g0.onnx", "unet.qdq.g1.onnx"]
    assert spec.inputs[0].name == "sample" and spec.inputs[0].role == "sample" and spec.sampler.kind == "ddim"
    assert spec.files()["conditioning.file"] == "conditioning.safetensors"
    spec.write(tmp_path)
    assert (tmp_path / RUNTIME_FILE).read_bytes() == (exp / RUNTIME_FILE).read_bytes()


def test_engine_manifest_reads_back_with_backend_details(folders, tmp_path):
    _, eng = folders
    meta = EngineManifest.read(eng, BACKENDS)
    assert meta.backend == "onnxruntime" and len(meta.engines) == 2
    e = meta.engines[0]
    assert isinstance(e, EngineEntry) and e.file_sha256 == file_sha256(eng / e.file)
    assert set(e.details) == {"weights", "onnxruntime"}  # ONNX Runtime's own facts, kept as they were written
    assert e.to_json() == json.loads((eng / ENGINE_FILE).read_text())["engines"][0]
    assert meta.config["settings"] == {"weights": "auto"} and meta.cpu and RUNTIME_FILE in meta.files_sha256


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda d: d["conditioning"].update(null_id="one"), "runtime.json: conditioning.null_id: expected an integer"),
        (lambda d: d["inputs"][0].pop("shape"), "runtime.json: inputs[0]: missing key 'shape'"),
        (lambda d: d["graphs"][1].update(file="../x.onnx"), "runtime.json: graphs[1].file: '../x.onnx' points outside"),
        (lambda d: d.update(version=1), "made by an older diffquant"),
    ],
)
def test_a_wrong_runtime_field_is_named(folders, tmp_path, damage, needle):
    exp, _ = folders
    shutil.copytree(exp, tmp_path / "exp")
    data = json.loads((tmp_path / "exp" / RUNTIME_FILE).read_text())
    damage(data)
    (tmp_path / "exp" / RUNTIME_FILE).write_text(json.dumps(data))
    with pytest.raises(DiffquantError, match=re.escape(needle)):
        RuntimeSpec.read(tmp_path / "exp")


def test_engine_manifest_refuses_an_unknown_backend_and_a_changed_side_file(folders, tmp_path):
    _, eng = folders
    shutil.copytree(eng, tmp_path / "eng")
    path = tmp_path / "eng" / ENGINE_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "backend": "mystery"}))
    with pytest.raises(DiffquantError, match="backend: expected one of"):
        EngineManifest.read(tmp_path / "eng", BACKENDS)
    path.write_text(json.dumps(data))
    (tmp_path / "eng" / "conditioning.safetensors").write_bytes(b"changed")
    with pytest.raises(DiffquantError, match="changed since the folder was built"):
        EngineManifest.read(tmp_path / "eng", BACKENDS)


def test_run_report_needs_the_settings_validate_uses(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"model": "m", "onnx": "x.onnx", "settings": {"steps": 4}}))
    report = RunReport.read(tmp_path)
    assert report.target == "tensorrt" and report.graphs == []  # defaults for what an older report lacks
    with pytest.raises(DiffquantError, match="settings lacks 'calib_samples'"):
        report.recorded_settings(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"model": "m", "onnx": "x.onnx", "settings": {}, "parity": []}))
    with pytest.raises(DiffquantError, match="report.json: parity: expected a mapping"):
        RunReport.read(tmp_path)
