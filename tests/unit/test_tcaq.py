"""TCAQ-DM's TCR and PAR on real tiny denoisers: the factors follow the paper's equations, the
scaled plan deploys exactly (ONNX Runtime with fusion off matches fake-quant within one step),
and PAR reconstructs again on the fake-quant model's own trajectories, starting from the rounding
found so far."""

import onnx
import pytest
import torch

from diffquant.calib_data import load_calib
from diffquant.eval import check_parity
from diffquant.exporters import export, lint
from diffquant.passes import load_recipe, quantize
from diffquant.passes.reconstruct import AdaRound
from diffquant.passes.tcr import TCRConfig, tcr_factors
from diffquant.quant import fake_quant_forms
from diffquant.quant.fake import fake_quant
from diffquant.quant.format import PerAxis, QuantFormat
from tests.conftest import tiny_calib

FAST = {"reconstruct": {"iters": 6, "samples": 16, "batch_size": 4}}


def test_tcr_factors_follow_the_equations_and_the_cap():
    m = torch.tensor([[1.0, 2.0, 4.0, 0.0], [2.0, 2.0, 2.0, 0.0]])  # [T, C]; the last channel never fires
    # t0: s = 1, r = 1, 2, 4; t1: s = 2, r = 1, 1, 1; r_c = sum_t m r / sum_t m
    assert torch.allclose(tcr_factors(m, 100.0), torch.tensor([1.0, 6 / 4, 18 / 6, 1.0]))
    assert torch.allclose(tcr_factors(m, 2.0), torch.tensor([1.0, 1.5, 2.0, 1.0]))
    with pytest.raises(ValueError, match="r_max"):
        TCRConfig(r_max=0.5)


def test_tcr_plan_scales_siblings_together_and_deploys_exactly(tiny_unet, calib_cache, tmp_path):
    calib = tiny_calib(tiny_unet, calib_cache)
    recipe = load_recipe("tcaq", {"reconstruct": {"iters": 6, "samples": 16, "batch_size": 4, "par_rounds": 0}})
    plan = quantize(tiny_unet, recipe, calib, bits="w4a8", progress=False)
    scaled = {
        n: lp.sites["input"].multiplier
        for n, lp in plan.layers.items()
        if lp.act and lp.sites["input"].multiplier is not None
    }
    assert scaled and all(
        float(m.max()) <= 1.0 and float(m.min()) >= 1 / 10 - 1e-3 for m in scaled.values()
    )  # 1/r, r in [1, R]
    assert any(float(m.min()) < 0.99 for m in scaled.values())
    attn = [n.removesuffix(".to_q") for n in scaled if n.endswith("attn1.to_q")]
    assert attn and all(
        torch.equal(scaled[f"{a}.to_q"], scaled[f"{a}.to_k"]) and torch.equal(scaled[f"{a}.to_q"], scaled[f"{a}.to_v"])
        for a in attn
    )  # one tensor, one vector
    res = export(plan, tiny_unet, tmp_path)
    model = onnx.load(str(res.qdq_onnx))
    assert lint(model).ok
    assert plan.operands  # DAQ's sites: research form only, so parity is against the deployed form
    _, fq = fake_quant_forms(tiny_unet, plan)
    r = check_parity(fq, model, [(ts, calib.at(ts, 4)) for ts in calib.timesteps])
    assert r.weight_max_step_error == 0.0 and r.max_step_error <= 1.0, r.worst_tensors


def test_adaround_can_start_from_an_earlier_decision():
    w = torch.randn(8, 16)
    scale = w.abs().amax(dim=1) / 7
    fmt = QuantFormat(bits=4, granularity=PerAxis(0))
    first = AdaRound(w, scale, fmt)
    with torch.no_grad():
        first.v.copy_(torch.randn_like(first.v) * 3)
    decided = first.hard()
    again = AdaRound(w, scale, fmt, start=decided)
    assert torch.equal(again.hard(), decided)
    assert (
        again.soft() - decided
    ).abs().max() <= 0.02 * scale.max()  # starts within the margin of the decision, not saturated
    assert torch.equal(fake_quant(decided, scale, fmt), decided)


def test_par_rounds_reconstruct_on_the_quantized_models_trajectories(tiny_dit, calib_cache):
    calib = tiny_calib(tiny_dit, calib_cache)
    before = {p.name for p in calib.folder.parent.iterdir()}
    plan = quantize(
        tiny_dit,
        load_recipe("tcaq", {"reconstruct": {**FAST["reconstruct"], "par_rounds": 2}}),
        calib,
        bits="w4a8",
        progress=False,
    )
    titles = [r.title for r in plan.reports if r.pass_name == "reconstruct"]
    assert (
        len(titles) == 3
        and "PAR round 1 of 2 (3 iterations" in titles[1]
        and "PAR round 2 of 2 (2 iterations" in titles[2]
    )
    new = sorted({p.name for p in calib.folder.parent.iterdir()} - before)
    assert len(new) == 2  # one trajectory set per round, each from the model as the previous round left it
    par = load_calib(calib.folder.parent / new[0])
    assert par.timesteps == calib.timesteps and len(par) == len(calib)
    drift = max(
        float((par.shards[t]["hidden_states"] - calib.shards[t]["hidden_states"]).abs().max())
        for t in calib.timesteps[1:]
    )
    assert drift > 0  # the same seeds, moved by the quantized model
    for lp in plan.quantized_layers():
        if lp.weight:
            w = plan.weights[lp.name]
            assert torch.equal(fake_quant(w, lp.weight_site.scale, lp.weight), w)  # hardened onto the grid
