"""The minmax pass: weight ranges by method, activation ranges per timestep, zero range."""

from pathlib import Path

import pytest
import torch
from torch import nn

from diffquant.calib_data import CalibConfig, CalibSet
from diffquant.errors import DiffquantError
from diffquant.models.inputs import NamedInputs
from diffquant.passes.context import PassContext
from diffquant.passes.minmax import MinMaxConfig, minmax_pass
from diffquant.passes.observe.activations import observe_plan_inputs
from diffquant.passes.observe.observers import weight_amax
from diffquant.quant import LayerPlan, PerAxis, QuantFormat, QuantPlan


class Toy(nn.Module):
    """fc1 reads x * t; fc2 reads x * 0 (a dead input)."""

    def __init__(self):
        super().__init__()
        self.model = nn.ModuleDict({"fc1": nn.Linear(4, 4), "fc2": nn.Linear(4, 4)})

    def forward(self, sample, timestep):
        return self.model["fc1"](sample * timestep[:, None]) + self.model["fc2"](sample * 0)


def _calib():
    shards = {}
    for ts in (10.0, 20.0):
        x = torch.ones(3, 4)
        shards[ts] = NamedInputs({"sample": x, "timestep": torch.full((3,), ts)}, ["sample", "timestep"])
    return CalibSet(folder=Path("toy"), config=CalibConfig(), timesteps=[10.0, 20.0], shards=shards)


def _plan(layers):
    plan = QuantPlan(model="toy", model_digest="x", request="w8a8", state="calibrating")
    for n in layers:
        plan.layers[n] = LayerPlan.new(n, "linear", "r", QuantFormat(8, granularity=PerAxis(0)), QuantFormat(8))
    return plan


def test_activation_ranges_keyed_by_timestep():
    ctx = PassContext(denoiser=Toy(), plan=_plan(["fc1"]), calib=_calib(), progress=False)
    assert observe_plan_inputs(ctx).amax["fc1:input"] == {10.0: 10.0, 20.0: 20.0}
    minmax_pass(ctx, MinMaxConfig())
    assert float(ctx.plan.act_scale("fc1")) == pytest.approx(20.0 / 127, rel=1e-3)
    ctx2 = PassContext(denoiser=Toy(), plan=_plan(["fc1"]), calib=_calib(), progress=False)
    minmax_pass(ctx2, MinMaxConfig(act_reduce="mean"))
    assert float(ctx2.plan.act_scale("fc1")) == pytest.approx(15.0 / 127, rel=1e-3)


def test_zero_range_input_is_a_clear_error():
    ctx = PassContext(denoiser=Toy(), plan=_plan(["fc1", "fc2"]), calib=_calib(), progress=False)
    with pytest.raises(DiffquantError, match=r"layer fc2: its input is identically zero.*activations: false"):
        minmax_pass(ctx, MinMaxConfig())


def test_weight_range_methods():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[0, 0] = 40.0  # an outlier in channel 0
    fmt = QuantFormat(4, granularity=PerAxis(0))
    mm = weight_amax(w, fmt, "minmax")
    assert torch.equal(mm, w.abs().amax(1))
    mse = weight_amax(w, fmt, "mse")
    pct = weight_amax(w, fmt, "percentile", pct=99.0)
    assert (mse <= mm).all() and (pct <= mm).all()
    assert mse[0] < 40.0  # the search clips the outlier channel at 4 bits
    assert ((mse / mm) >= 0.2 - 1e-6).all()  # at most 80 steps of 1 %
