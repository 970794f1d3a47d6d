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


def test_help_shows_every_default_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("(default: 25)", "(default: tensorrt)", "(default: 0.99)", "(default: minmax)", "--debug"):
        assert text in out, text
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("diffquant ")


def test_recipes_lists_bits_and_passes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("mpqdm "))
    assert "w2a4" in line and "minmax -> omq -> efficientdm" in line and "4 timestep groups" in line


def test_plan_set_applies_or_rejects(capsys):
    assert main(["plan", "--model", "builtin:digits-sd", "--recipe", "minmax", "--set", "minmax.act_range=mse"]) == 0
    capsys.readouterr()
    assert main(["plan", "--model", "builtin:digits-sd", "--recipe", "minmax", "--set", "minmax.act_range=nope"]) == 2
    assert "act_range" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    import diffquant.cli.quantize as cli

    def boom(a):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "cmd_recipes", boom)
    assert main(["recipes"]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaboom" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError):
        main(["recipes", "--debug"])


def test_sensitivity_writes_its_report_and_refuses_bad_options(tmp_path, capsys):
    out = tmp_path / "sens"
    argv = [
        "sensitivity",
        "--model",
        "builtin:digits-dit",
        "--configs",
        "24",
        "--holdout",
        "6",
        "--predictors",
        "ridge",
        "--methods",
        "uaq,kmeans-a",
        "--calib-samples",
        "4",
        "--timesteps",
        "2",
        "--per-step",
        "2",
        "--budgets",
        "3.7",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "DiTs prefer k-means" in printed and "ridge Spearman" in printed
    assert {"sensitivity.md", "sensitivity.json", "sensitivity_layers.png"} <= {p.name for p in out.iterdir()}
    assert main(argv) == 2 and "already exists" in _err(capsys)
    assert main(argv[:-1] + [str(tmp_path / "o2"), "--holdout", "22"]) == 2 and "--holdout 22" in _err(capsys)
    assert not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit):
        main(argv[:-1] + [str(tmp_path / "o3"), "--methods", "gptq"])
    assert "comma list of uaq, kmeans-c, kmeans-a" in _err(capsys)
    assert main(argv[:-1] + [str(tmp_path / "o4"), "--score", "samples", "--probe-samples", "3"]) == 0
    md = (tmp_path / "o4" / "sensitivity.md").read_text()
    assert (
        "PSNR (dB) of 3 samples" in md
        and "measured sample PSNR dB" in md
        and "measured noise SNR dB" in (out / "sensitivity.md").read_text()
    )
