"""The `validate` job: a run folder's model and recorded inputs from its (cached) calibration data
at ``cfg.timesteps`` timesteps (each timestep group covered), compared by `eval.validate`."""

from __future__ import annotations

from pathlib import Path

from diffquant.artifacts import RunReport
from diffquant.calib_data import CalibConfig, collect
from diffquant.calib_data.collect import pick_inputs
from diffquant.eval.validate import ValidateConfig, ValidationResult, validate
from diffquant.jobs.run import RunConfig, load_run_model
from diffquant.quant import QuantPlan

__all__ = ["validate_run"]


def validate_run(run_dir: str | Path, cfg: ValidateConfig | None = None) -> ValidationResult:
    """`diffquant validate RUN`: rebuild the run's inputs and compare its graphs (see `eval.validate`)."""
    cfg = cfg or ValidateConfig()
    run = Path(run_dir)
    report = RunReport.read(run)
    st = report.recorded_settings(run)
    builtin = report.model.startswith("builtin:")
    model = RunConfig(model=report.model, prompts=st["prompts"], resolution=None if builtin else st.get("resolution"))
    denoiser = load_run_model(model)
    plan = QuantPlan.load(run / "plan")
    ccfg = CalibConfig(
        samples=st["calib_samples"], steps=st["steps"], timesteps=st["calib_timesteps"], guidance=st["guidance"]
    )
    calib = collect(denoiser, ccfg, progress=cfg.progress)
    inputs = pick_inputs(calib, cfg.timesteps, cfg.samples, plan.group_of, plan.n_groups)
    return validate(run, denoiser, inputs, cfg, report)
