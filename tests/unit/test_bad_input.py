"""Bad input, one case per class: every file and value a user (or a hostile one) can hand the
CLI gives exit 2 and one line naming the file and key, writes nothing, and never escapes its
folder. The artifacts are real: the builtin DiT calibrated, quantized, exported and built."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

from diffquant.cli import main

MODEL = "builtin:digits-dit"


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    """calibration folder, plan, export folder (onnxruntime target) and engine folder."""
    root = tmp_path_factory.mktemp("artifacts")
    assert (
        main(
            [
                "calibrate",
                "--model",
                MODEL,
                "--samples",
                "10",
                "--steps",
                "4",
                "--timesteps",
                "2",
                "--cache",
                str(root / "cal"),
                "--quiet",
            ]
        )
        == 0
    )
    (calib,) = (root / "cal").iterdir()
    calib.rename(root / "calib")
    assert (
        main(["quantize", "--model", MODEL, "--calib", str(root / "calib"), "--out", str(root / "plan"), "--quiet"])
        == 0
    )
    assert (
        main(
            [
                "export",
                "--model",
                MODEL,
                "--plan",
                str(root / "plan"),
                "--out",
                str(root / "exp"),
                "--target",
                "onnxruntime",
            ]
        )
        == 0
    )
    assert main(["build", str(root / "exp" / "unet.qdq.onnx"), "--out", str(root / "eng")]) == 0
    return root


def _copy(art: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(art / name, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _refused(argv: list[str], needles: list[str], capsys, nothing: Path | None = None) -> str:
    """Exit 2, one message naming every needle, no traceback, and ``nothing`` not written."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("diffquant: error: "), err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    print(err.strip())  # shown with `pytest -rP`: the message each case gets
    if nothing is not None:
        assert not nothing.exists() and not list(nothing.parent.glob(f".{nothing.name}.*")), f"{nothing} was written"
    return err


# ---- command-line values: refused by argparse before any work (exit 2, usage) ----


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--steps", "0", "--out", "{tmp}/o"], "--steps: 0 is too small"),
        (["run", "--steps", "-1", "--out", "{tmp}/o"], "--steps: -1 is too small"),
        (["run", "--timestep-groups", "0", "--out", "{tmp}/o"], "--timestep-groups: 0 is too small"),
        (["run", "--samples", "ten", "--out", "{tmp}/o"], "--samples: 'ten' is not a whole number"),
        (["generate", "{tmp}/eng", "--batch", "0"], "--batch: 0 is too small"),
        (["generate", "{tmp}/eng", "-n", "0"], "-n: 0 is too small"),
        (["build", "{tmp}/x.onnx", "--out", "{tmp}/o", "--threads", "-2"], "--threads: -2 is too small"),
    ],
)
def test_cli_values_are_checked_before_any_work(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    print(err.strip().splitlines()[-1])
    assert needle in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (["minmax.batch_size=abc"], ["batch_size", "expected an integer", "'abc'"]),
        (["minmax.batch_size=0"], ["batch_size", ">= 1"]),
        (["minmax.percentile=high"], ["percentile", "expected a number"]),
        (["x.y=[1,"], ["--set", "not valid YAML"]),
        (["reconstruct.iters=5"], ["--set names passes", "reconstruct"]),
        (["minmax.version=2"], ["version 2", "reads version 1"]),
    ],
)
def test_set_values_are_typed(sets, needles, tmp_path, capsys):
    argv = ["run", "--model", MODEL, "--out", tmp_path / "o"] + [x for s in sets for x in ("--set", s)]
    _refused(argv, needles, capsys, tmp_path / "o")


# ---- recipe files: typed, versioned, contained ----

RECIPE = "name: r\nbits: w8a8\ntargeting:\n  - {pattern: '*', classes: [Linear]}\npasses:\n  - name: minmax\n"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (RECIPE + "use_default_skip: 'false'\n", ["use_default_skip", "expected true or false", "'false'"]),
        (
            RECIPE.replace("classes: [Linear]", "classes: Linear"),
            ["targeting[0]: classes", "expected a list of strings"],
        ),
        (RECIPE + "version: one\n", ["version", "expected an integer"]),
        (RECIPE + "version: 7\n", ["version 7"]),
        (
            RECIPE.replace("- name: minmax\n", "- name: minmax\n    config: {percentile: high}\n"),
            ["percentile", "expected a number"],
        ),
        (RECIPE.replace("- name: minmax\n", "- name: minmax\n    config: {version: 3}\n"), ["passes[0]", "version 3"]),
        (RECIPE + "timestep_groups: 0\n", ["timestep_groups must be >= 1"]),
        (RECIPE + "bits: w4g63a8x\n", ["bits", "bad bits"]),
        ("- just a list\n", ["a recipe must be a mapping"]),
    ],
)
def test_recipe_values_are_typed(text, needles, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    _refused(["plan", "--model", MODEL, "--recipe", path], [str(path), *needles], capsys)


@pytest.mark.parametrize("name", ["../../../etc/passwd", "../recipes/minmax", "minmax/../dmq", "/etc/hostname"])
def test_recipe_names_resolve_only_inside_the_recipes_folder(name, capsys):
    _refused(["plan", "--model", MODEL, "--recipe", name], ["unknown recipe", "path ending in .yaml"], capsys)


def test_block_size_that_fits_no_layer_is_refused(art, tmp_path, capsys):
    _refused(
        ["quantize", "--model", MODEL, "--calib", art / "calib", "--bits", "w4g63a8", "--out", tmp_path / "p"],
        ["w4g63a8", "block size 63 divides", "widths"],
        capsys,
        tmp_path / "p",
    )


# ---- calibration folders ----


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("step*.safetensors"))


def _drop_cond(folder: Path, *, every: bool) -> None:
    for shard in _shards(folder)[: None if every else 1]:
        t = load_file(str(shard))
        del t["class_labels"]
        save_file(t, str(shard))


def _wrong_shape(folder: Path) -> None:
    shard = _shards(folder)[-1]
    t = load_file(str(shard))
    t["hidden_states"] = t["hidden_states"][:, :, :8, :8].contiguous()
    save_file(t, str(shard))


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (lambda f: _drop_cond(f, every=False), ["step003.safetensors", "holds", "first shard"]),
        (lambda f: _drop_cond(f, every=True), ["lacks the input", "class_labels"]),
        (_wrong_shape, ["'hidden_states' has per-sample shape [1, 8, 8]"]),
        (
            lambda f: _edit_json(f / "index.json", lambda d: d["shards"][0].update(timestep=float("nan"))),
            ["shards[0].timestep", "expected a number"],
        ),
        (
            lambda f: _edit_json(f / "index.json", lambda d: d["shards"][0].update(file="../../secret.safetensors")),
            ["shards[0].file", "outside its folder"],
        ),
        (lambda f: _edit_json(f / "index.json", lambda d: d["shards"][0].update(count=7)), ["index says 7 rows"]),
        (lambda f: _edit_json(f / "index.json", lambda d: d.update(version=9)), ["index version 9"]),
        (lambda f: (f / "index.json").write_text("{"), ["index.json", "not valid JSON"]),
    ],
)
def test_damaged_calibration_is_refused(damage, needles, art, tmp_path, capsys):
    calib = _copy(art, "calib", tmp_path)
    damage(calib)
    _refused(["quantize", "--model", MODEL, "--calib", calib, "--out", tmp_path / "p"], needles, capsys, tmp_path / "p")


# ---- plans ----


def _plan_tensors(folder: Path, fn) -> None:
    t = load_file(str(folder / "plan.safetensors"))
    fn(t)
    save_file(t, str(folder / "plan.safetensors"))


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (
            lambda f: _plan_tensors(f, lambda t: t.pop("transformer_blocks.0.attn1.to_k:input.scale")),
            ["to_k:input.scale", "is missing"],
        ),
        (
            lambda f: _plan_tensors(f, lambda t: t.pop("transformer_blocks.0.attn1.to_k:weight.scale")),
            ["to_k:weight.scale", "is missing"],
        ),
        (
            lambda f: _plan_tensors(
                f,
                lambda t: t.update(
                    {
                        "transformer_blocks.0.attn1.to_k:weight.scale": t[
                            "transformer_blocks.0.attn1.to_k:weight.scale"
                        ][:3].clone()
                    }
                ),
            ),
            ["to_k:weight.scale", "has shape [3]"],
        ),
        (lambda f: _edit_json(f / "plan.json", lambda d: d.update(state="calibrating")), ["not frozen"]),
        (lambda f: (f / "plan.json").write_text("[]"), ["plan.json", "expected a JSON object"]),
    ],
)
def test_damaged_plan_is_refused(damage, needles, art, tmp_path, capsys):
    plan = _copy(art, "plan", tmp_path)
    damage(plan)
    _refused(
        ["export", "--model", MODEL, "--plan", plan, "--out", tmp_path / "o"],
        ["plan.json", *needles],
        capsys,
        tmp_path / "o",
    )


def test_export_never_overwrites(art, tmp_path, capsys):
    out = _copy(art, "exp", tmp_path)
    before = sorted(p.name for p in out.iterdir())
    _refused(
        ["export", "--model", MODEL, "--plan", art / "plan", "--out", out, "--target", "tensorrt"],
        ["already exists"],
        capsys,
    )
    assert sorted(p.name for p in out.iterdir()) == before


# ---- export folders and build ----


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (
            lambda f: _edit_json(f / "runtime.json", lambda d: d["conditioning"].update(file="../../secret.txt")),
            ["conditioning.file", "outside its folder"],
        ),
        (
            lambda f: _edit_json(
                f / "runtime.json", lambda d: d["graphs"].append({"file": "../other.onnx", "timestep_range": []})
            ),
            ["graphs[1].file", "outside"],
        ),
        (lambda f: (f / "runtime.json").write_text("nope"), ["runtime.json", "not valid JSON"]),
        (lambda f: (f / "unet.qdq.onnx").write_bytes(b""), ["unet.qdq.onnx", "holds no graph"]),
    ],
)
def test_build_refuses_a_damaged_export(damage, needles, art, tmp_path, capsys):
    exp = _copy(art, "exp", tmp_path)
    (tmp_path / "secret.txt").write_text("secret")
    damage(exp)
    _refused(["build", exp / "unet.qdq.onnx", "--out", tmp_path / "eng"], needles, capsys, tmp_path / "eng")


def test_lint_refuses_an_empty_graph(tmp_path, capsys):
    (tmp_path / "empty.onnx").write_bytes(b"")
    _refused(["lint", tmp_path / "empty.onnx"], ["empty.onnx", "holds no graph"], capsys)


# ---- engine folders ----


def _reorder_conditioning(folder: Path) -> None:
    t = load_np(str(folder / "conditioning.safetensors"))
    t["cond.class_labels"] = t["cond.class_labels"][::-1].copy()
    save_np(t, str(folder / "conditioning.safetensors"))


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (lambda f: (f / "engine.json").write_text("{oops"), ["engine.json", "not valid JSON"]),
        (
            lambda f: _edit_json(f / "engine.json", lambda d: d.pop("engines")),
            ["engine.json", "missing key", "engines"],
        ),
        (lambda f: _edit_json(f / "engine.json", lambda d: d.update(version=99)), ["engine folder version 99"]),
        (
            lambda f: _edit_json(f / "engine.json", lambda d: d["engines"][0].update(file="../other.onnx")),
            ["engines[0].file", "outside its folder"],
        ),
        (lambda f: _edit_json(f / "engine.json", lambda d: d.update(backend="cuda")), ["backend", "'cuda'"]),
        (_reorder_conditioning, ["conditioning.safetensors", "changed since the folder was built"]),
        (
            lambda f: (f / "conditioning.safetensors").write_bytes((f / "conditioning.safetensors").read_bytes()[:40]),
            ["conditioning.safetensors", "changed"],
        ),
        (
            lambda f: _edit_json(f / "runtime.json", lambda d: d["sampler"].update(guidance="none")),
            ["runtime.json", "changed"],
        ),
    ],
)
def test_generate_refuses_a_damaged_engine_folder(damage, needles, art, tmp_path, capsys):
    eng = _copy(art, "eng", tmp_path)
    damage(eng)
    _refused(
        ["generate", eng, "--prompt", "seven", "-n", "2", "--out", tmp_path / "s.png", "--quiet"],
        needles,
        capsys,
        tmp_path / "s.png",
    )


def test_generate_out_must_be_a_file(art, tmp_path, capsys):
    _refused(
        ["generate", art / "eng", "--prompt", "seven", "-n", "2", "--out", tmp_path],
        ["is a folder", "samples.png"],
        capsys,
    )


# ---- run folders (validate) ----


@pytest.mark.parametrize(
    ("report", "needles"),
    [
        ("{", ["report.json", "not valid JSON"]),
        (json.dumps({"model": MODEL, "onnx": "unet.qdq.onnx"}), ["report.json", "missing key", "settings"]),
        (
            json.dumps({"model": MODEL, "onnx": "unet.qdq.onnx", "settings": {"steps": 4}}),
            ["settings lacks", "calib_samples"],
        ),
        (
            json.dumps(
                {
                    "model": MODEL,
                    "onnx": "x",
                    "settings": {
                        "calib_samples": "many",
                        "steps": 4,
                        "calib_timesteps": 2,
                        "guidance": 3.0,
                        "prompts": "",
                    },
                }
            ),
            ["settings.calib_samples", "expected an integer"],
        ),
    ],
)
def test_validate_refuses_a_damaged_report(report, needles, tmp_path, capsys):
    (tmp_path / "report.json").write_text(report)
    _refused(["validate", tmp_path], needles, capsys)


# ---- signals ----


def test_sigterm_during_run_cleans_up_and_exits_143(tmp_path):
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        "-m",
        "diffquant.cli",
        "run",
        "--model",
        MODEL,
        "--out",
        str(out),
        "--samples",
        "10",
        "--calib-samples",
        "8",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the first stage header is printed inside the run's temp folder
        seen.append(line)
        if line.startswith("[1/5]"):
            break
    assert list(tmp_path.glob(".o.*")), f"the run's temp folder never appeared: {seen}"
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".o.*"))
