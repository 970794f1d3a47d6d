"""The numpy Euler and DPM-Solver++ schedulers against diffusers' own, step for step, over the
spacings and prediction types real pipelines ship (the runtime samples with them torch-free)."""

import numpy as np
import pytest
import torch

from diffquant.artifacts import SamplerEntry
from diffquant.engines.scheduler import NumpyDPMSolver, NumpyEuler, numpy_scheduler, scheduler_kind
from diffquant.errors import DiffquantError

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
CONFIGS = [
    {**SD, "timestep_spacing": "leading"},  # SDXL
    {**SD, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    {**SD, "timestep_spacing": "trailing"},
    {"beta_schedule": "linear", "timestep_spacing": "linspace"},  # DiT's DPM-Solver
]


def _run(ref, ours, steps: int, *, scale: bool) -> None:
    ref.set_timesteps(steps)
    ts = ours.timesteps(steps)
    assert np.allclose(ts, ref.timesteps.numpy(), atol=1e-4)
    assert ours.init_noise_sigma(steps) == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)
    gen = np.random.default_rng(0)
    x = gen.standard_normal((2, 4, 4, 4)).astype(np.float32) * np.float32(ours.init_noise_sigma(steps))
    xt = torch.from_numpy(x.copy())
    for t_ref, t in zip(ref.timesteps, ts):
        if scale:
            want = ref.scale_model_input(xt, t_ref).numpy()
            np.testing.assert_allclose(
                ours.scale_input(x, t), want, atol=1e-6 * max(1.0, np.abs(want).max()), rtol=1e-5
            )
        out = gen.standard_normal(x.shape).astype(np.float32)
        xt = ref.step(torch.from_numpy(out), t_ref, xt).prev_sample
        x = ours.step(out, t, x, steps)
        np.testing.assert_allclose(x, xt.numpy(), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [4, 20])
def test_numpy_euler_matches_diffusers(cfg, steps):
    from diffusers import EulerDiscreteScheduler

    _run(EulerDiscreteScheduler(**cfg), NumpyEuler(cfg), steps, scale=True)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("steps", [4, 20])
def test_numpy_dpm_solver_matches_diffusers(cfg, steps):
    from diffusers import DPMSolverMultistepScheduler

    ours = NumpyDPMSolver(cfg)
    _run(DPMSolverMultistepScheduler(**cfg), ours, steps, scale=False)
    ours.reset()  # a second run starts without the first one's history
    _run(DPMSolverMultistepScheduler(**cfg), ours, steps, scale=False)


def test_scheduler_choice_and_refusals():
    ddim = SamplerEntry(kind="ddim")
    assert scheduler_kind(ddim, {**SD, "_class_name": "PNDMScheduler"}) == "ddim"  # no numpy form: DDIM on it
    assert scheduler_kind(ddim, {**SD, "_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert scheduler_kind(ddim, {**SD, "_class_name": "DPMSolverMultistepScheduler"}, "ddim") == "ddim"
    with pytest.raises(DiffquantError, match="flow-matching"):
        scheduler_kind(ddim, SD, "flow")
    with pytest.raises(DiffquantError, match="use_karras_sigmas"):
        numpy_scheduler(ddim, {**SD, "use_karras_sigmas": True}, "euler")
    with pytest.raises(DiffquantError, match="solver_order"):
        NumpyDPMSolver({**SD, "solver_order": 3})
