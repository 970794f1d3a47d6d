"""The sampler uses the model's scheduler config, and class batches follow the protocol."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffquant.models.sampler import make_scheduler, prompt_batch
from diffquant.zoo.builtin import scheduler_config
from tests.conftest import make_tiny_unet


def test_ddim_scheduler_takes_the_model_config():
    # regression: filtering keys by the decorated __init__'s co_varnames dropped every key and
    # DDIM silently ran on its default linear schedule
    cfg = scheduler_config()
    d = make_tiny_unet()
    d.scheduler = cfg
    sched = make_scheduler(d, 25)
    want = DDPMScheduler(**cfg).alphas_cumprod
    assert torch.equal(sched.alphas_cumprod, want)
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    assert sched.timesteps[0].item() == 961 and sched.timesteps[-1].item() == 1  # leading, offset 1
    # keys DDIM does not know (from another scheduler's config) are dropped, not fatal
    d.scheduler = {**cfg, "variance_type": "fixed_small", "_class_name": "DDPMScheduler"}
    assert make_scheduler(d, 5).config.num_train_timesteps == 1000


def test_prompt_batch_protocol():
    d = make_tiny_unet()
    b = prompt_batch(d, 23, seed=5)
    assert b.ids.tolist() == [i % 10 for i in range(23)]
    assert b.noise.shape == (23, *d.sample_shape)
    assert torch.equal(b.noise[:7], prompt_batch(d, 7, seed=5).noise)  # sample i does not depend on n
    assert torch.equal(b.cond["encoder_hidden_states"], d.encode(b.ids)["encoder_hidden_states"])
    assert torch.equal(
        b.uncond["encoder_hidden_states"], d.encode(torch.full((23,), d.null_id))["encoder_hidden_states"]
    )


@pytest.mark.parametrize(
    "cfg",
    [
        {"shift": 3.0},  # SD3: the scheduler's own sigma range, shifted
        {
            "shift": 1.0,
            "use_dynamic_shifting": True,
            "base_shift": 0.5,
            "max_shift": 1.15,
        },  # Flux: linspace sigmas, dynamic shift
    ],
)
def test_numpy_flow_euler_matches_diffusers(cfg):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffquant.engines.scheduler import NumpyFlowEuler

    steps, mu = 6, 0.8
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    mode = "linspace" if cfg.get("use_dynamic_shifting") else "scheduler"
    if mode == "linspace":
        ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    else:
        ref.set_timesteps(steps)
    ours = NumpyFlowEuler(cfg, mode, mu if mode == "linspace" else None)
    assert np.allclose(ours.timesteps(steps), ref.timesteps.numpy(), atol=1e-4)
    gen = np.random.default_rng(0)
    x = gen.standard_normal((2, 4)).astype(np.float32)
    xt = torch.from_numpy(x.copy())
    for t in ref.timesteps:
        v = gen.standard_normal((2, 4)).astype(np.float32)
        xt = ref.step(torch.from_numpy(v), t, xt).prev_sample
        x = ours.step(v, float(t), x, steps)
    assert np.allclose(x, xt.numpy(), atol=1e-5)
