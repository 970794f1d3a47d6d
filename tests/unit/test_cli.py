"""The CLI: bad input gives one clear message, exit code 2, and leaves nothing half-written."""

import pytest

from diffquant.cli import main


def _err(capsys):
    return capsys.readouterr().err


def test_lint_missing_and_corrupt(tmp_path, capsys):
    assert main(["lint", str(tmp_path / "missing.onnx")]) == 2
    assert "does not exist" in _err(capsys)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    assert main(["lint", str(bad)]) == 2
    err = _err(capsys)
    assert "bad.onnx" in err and "not a readable ONNX" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--recipe", "nosuch", "--out", "{tmp}/o"], "unknown recipe"),
        (["run", "--bits", "w9a3", "--out", "{tmp}/o"], "bad bits"),
        (["run", "--model", "{tmp}/nomodel", "--out", "{tmp}/o"], "not found"),
        (["plan", "--model", "builtin:digits-xl"], "unknown builtin"),
        (["export", "--plan", "{tmp}/noplan", "--out", "{tmp}/o"], "no plan"),
    ],
)
def test_bad_input_exit_2(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert needle in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_existing_output_folder(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    assert main(["run", "--out", str(out)]) == 2
    assert "already exists" in _err(capsys)


def test_plan_prints_rule_per_layer(capsys):
    assert main(["plan", "--model", "builtin:digits-sd", "--bits", "w4a8"]) == 0
    out = capsys.readouterr().out
    assert "default-skip conv_in" in out and "all-conv-linear" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("down_blocks.0.resnets.0.conv1 "))
    assert "int4 per-channel" in line and "int8 per-tensor" in line
