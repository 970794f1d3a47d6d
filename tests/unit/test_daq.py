"""TCAQ-DM's DAQ: the power-law test tells the distributions apart, the explicit attention is
SDPA, and on a real tiny U-Net every attention's P becomes a plan site per timestep group that
the fake-quant model (research form) quantizes and the exported graph (deployed form) does not."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from diffquant.eval import check_parity
from diffquant.exporters import export, lint
from diffquant.passes import load_recipe, quantize
from diffquant.passes.daq import DAQConfig
from diffquant.passes.observe.powerlaw import compare, fit_power_law
from diffquant.quant import QuantPlan, apply_plan
from diffquant.quant.attention import ProbsQuant, attention_modules, explicit_attention
from diffquant.quant.format import QuantFormat
from diffquant.quant.modules import SiteQuantizer
from diffquant.quant.site import Site, SiteKey
from tests.conftest import tiny_calib


def test_the_power_law_test_tells_a_power_law_from_an_exponential():
    rng = np.random.default_rng(0)
    pl = 0.01 * (1 - rng.random(5000)) ** (-1 / 1.5)  # alpha 2.5 above x_min 0.01
    fit = fit_power_law(pl)
    assert abs(fit.alpha - 2.5) < 0.1 and fit.xmin < 0.02
    assert compare(fit, "exponential").power_law_wins(0.1)
    exp_fit = fit_power_law(rng.exponential(0.1, 5000))
    c = compare(exp_fit, "exponential")
    assert c.llr < 0 and c.p < 0.1
    assert fit_power_law(np.zeros(10)) is None


def test_explicit_attention_is_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.rand(5, 5, generator=g) > 0.3
    mask[:, 0] = True
    for kw in (
        {},
        {"attn_mask": mask},
        {"attn_mask": torch.randn(5, 5, generator=g)},
        {"is_causal": True},
        {"scale": 0.5},
    ):
        assert torch.allclose(
            explicit_attention(q, k, v, lambda p: p, **kw), F.scaled_dot_product_attention(q, k, v, **kw), atol=1e-5
        )


def test_log2_probs_quantizer_puts_p_on_powers_of_two():
    site = Site(SiteKey("a", "operand"), QuantFormat(bits=4, kind="log2"), torch.tensor([1.0]))
    p = torch.softmax(torch.randn(4, 16), dim=-1)
    out = ProbsQuant([SiteQuantizer(site)])(p)
    nz = out[out > 0]
    assert torch.equal(torch.log2(nz), torch.round(torch.log2(nz))) and nz.min() >= 2.0**-14


def test_daq_sites_research_form_and_deployed_form(tiny_unet, calib_cache, tmp_path):
    calib = tiny_calib(tiny_unet, calib_cache)
    recipe = load_recipe("minmax")
    recipe.passes.append(("daq", DAQConfig(samples=4000)))
    plan = quantize(tiny_unet, recipe, calib, bits="w8a4", progress=False, timestep_groups=2)
    attn = attention_modules(tiny_unet.model)
    assert {(s.key.module, s.key.index) for s in plan.operands.values()} == {(n, g) for n in attn for g in (0, 1)}
    assert {s.format.kind for s in plan.operands.values()} <= {"log2", "uniform"} and all(
        s.format.bits == 4 for s in plan.operands.values()
    )
    assert (
        tiny_unet.model.get_submodule(next(iter(attn))).processor.__class__.__name__ == "AttnProcessor2_0"
    )  # the FP model is given back
    plan.save(tmp_path / "plan")
    again = QuantPlan.load(tmp_path / "plan")
    assert {k: (s.format, float(s.scale)) for k, s in again.operands.items()} == {
        k: (s.format, float(s.scale)) for k, s in plan.operands.items()
    }
    res = export(again, tiny_unet, tmp_path / "x")
    model = onnx.load(str(res.qdq_onnx))
    assert lint(model).ok
    realized = json.loads((tmp_path / "x" / "realized.json").read_text())["layers"]
    assert all("research form only" in realized[k]["act"] for k in plan.operands)
    deployed, research = copy.deepcopy(tiny_unet), copy.deepcopy(tiny_unet)
    apply_plan(deployed.model, again, operands=False)
    apply_plan(research.model, again)
    inputs = [(ts, calib.at(ts, 4)) for ts in calib.timesteps if again.group_of(ts) == 0]
    r = check_parity(deployed, model, inputs)
    assert r.max_step_error <= 1.0, r.worst_tensors
    with torch.no_grad():
        x = inputs[0][1]
        assert not torch.allclose(research(**x), deployed(**x), atol=1e-4)  # P quantized only in the research form


def test_daq_modes_and_refusal(tiny_dit, calib_cache):
    calib = tiny_calib(tiny_dit, calib_cache)
    for mode in ("uniform", "log2"):
        recipe = load_recipe("minmax")
        recipe.passes.append(("daq", DAQConfig(samples=2000, mode=mode)))
        plan = quantize(tiny_dit, recipe, calib, bits="w8a6", progress=False)
        assert {s.format.kind for s in plan.operands.values()} == {mode}
    with pytest.raises(ValueError, match="mode"):
        DAQConfig(mode="nf4")
    recipe = load_recipe("minmax")
    recipe.passes.append(("daq", DAQConfig()))
    with pytest.raises(Exception, match="daq.bits"):
        quantize(tiny_dit, recipe, calib, bits="w8a16", progress=False)
