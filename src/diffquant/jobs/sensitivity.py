"""The `sensitivity` job: Qua2SeDiMo's explainable report on a model (`passes.qua2sedimo.analyze`),
from calibration data collected along the FP sampler, written atomically into a new folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffquant._io import atomic_folder
from diffquant.calib_data import CalibConfig, collect
from diffquant.errors import DiffquantError
from diffquant.jobs.run import RunConfig, load_run_model
from diffquant.passes.qua2sedimo.analyze import SensitivityConfig, analyze
from diffquant.passes.qua2sedimo.report import SensitivityReport, write_report

__all__ = ["SensitivityJob", "sensitivity_job"]


@dataclass
class SensitivityJob:
    """The model (as `run` reads it), the report folder to create, the calibration collected for
    the scores (``calib_samples`` trajectories, ``timesteps`` kept, seeded), and the analysis."""

    out: str
    model: str = "builtin:digits-sd"
    prompts: str = ""
    resolution: tuple[int, int] | None = None
    calib_samples: int = 16
    timesteps: int = 10
    analysis: SensitivityConfig = field(default_factory=SensitivityConfig)
    progress: bool = True


def _check(cfg: SensitivityJob) -> None:
    a = cfg.analysis
    if Path(cfg.out).exists():
        raise DiffquantError(f"output folder {cfg.out} already exists; pass another --out or delete it")
    if a.holdout >= a.configs - 5:
        raise DiffquantError(
            f"--holdout {a.holdout} leaves fewer than 5 of --configs {a.configs} to train the predictors; lower it"
        )
    if len(a.bits) < 2 or not all(2 <= b <= 7 for b in a.bits):
        raise DiffquantError(f"--bits {a.bits}: give two or more widths within 2..7, e.g. 3,4")
    if not all(2.0 <= b <= 16.0 for b in a.budgets):
        raise DiffquantError(f"--budgets {a.budgets}: average weight bits lie within 2..16, e.g. 3.5,3.7,3.9")


def sensitivity_job(cfg: SensitivityJob) -> tuple[SensitivityReport, list[Path]]:
    """Check the settings, load the model, collect calibration data, analyze, and write the
    report folder; returns the report and the files written (``sensitivity.md`` first)."""
    _check(cfg)
    d = load_run_model(RunConfig(model=cfg.model, prompts=cfg.prompts, resolution=cfg.resolution))
    ccfg = CalibConfig(samples=cfg.calib_samples, timesteps=cfg.timesteps, seed=cfg.analysis.seed)
    calib = collect(d, ccfg, progress=cfg.progress)
    rep = analyze(d, calib, cfg.analysis, progress=cfg.progress)
    with atomic_folder(cfg.out, "output folder") as tmp:
        files = write_report(rep, tmp)
    return rep, [Path(cfg.out) / f.name for f in files]
