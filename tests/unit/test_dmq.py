"""DMQ: adaptive timestep weighting, LES, PTS with voting, and their exact lowering (folded
multipliers, shifted INT8 weight codes) on tiny models."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from diffquant.errors import DiffquantError
from diffquant.eval import check_parity
from diffquant.exporters import export, lint
from diffquant.passes import load_recipe, quantize
from diffquant.passes.observe.weighting import AdaptiveWeighting, LinearWeighting, make_weighting
from diffquant.passes.pts import select_exponents
from diffquant.quant import QuantPlan, apply_plan
from diffquant.quant.fake import fake_quant
from diffquant.quant.format import PerAxis, QuantFormat, pts_budget
from tests.conftest import make_tiny_dit, make_tiny_unet, tiny_calib

# small settings; min-max ranges instead of the recipe's MSE search keep the tests fast
FAST = {
    "les": {"iters": 10, "samples": 16},
    "minmax": {"weight_range": "minmax", "act_range": "minmax"},
    "reconstruct": {"iters": 5, "samples": 12, "batch_size": 4},
    "pts": {"samples": 48},
}


@pytest.fixture(scope="module")
def dmq_unet(calib_cache):
    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    return d, calib, quantize(d, load_recipe("dmq", FAST), calib, bits="w4a8", progress=False)


def test_adaptive_weighting_follows_dmq_formula_with_ema():
    ts = [1.0, 500.0, 999.0]
    w = AdaptiveWeighting(ts, alpha=20.0, momentum=0.95)
    assert torch.equal(w.weights(torch.tensor(ts)), torch.ones(3))  # nothing seen yet
    w.update(torch.tensor([1.0, 500.0, 999.0]), torch.tensor([1.0, 2.0, 7.0]))
    w.update(torch.tensor([999.0, 999.0]), torch.tensor([17.0, 17.0]))  # EMA: 0.95 * 7 + 0.05 * 17 = 7.5
    assert w.ema[999.0] == pytest.approx(7.5)
    total = 1.0 + 2.0 + 7.5
    raw = torch.tensor([(1 - v / total) ** 20 for v in (1.0, 2.0, 7.5)])
    got = w.weights(torch.tensor(ts))
    assert torch.allclose(got, raw / raw.mean(), rtol=1e-5)
    assert got[0] > got[1] > got[2]  # the dominating (large-loss) timestep is down-weighted
    lin = LinearWeighting(ts).weights(torch.tensor(ts))
    assert lin[0] > lin[1] > lin[2] and float(lin.mean()) == pytest.approx(1.0)
    with pytest.raises(DiffquantError, match="available"):
        make_weighting("cosine", ts)


def test_pts_voting_needs_agreement_and_mse_takes_the_summed_minimum():
    # errors [k, samples, channels]: channel 0 - 9 of 10 samples prefer k=2; channel 1 - only 6 of 10 prefer k=1
    e = torch.ones(4, 10, 2)
    e[2, :9, 0] = 0.0
    e[1, :6, 1] = 0.5
    e[3, 6:, 1] = 0.0
    k, share = select_exponents(e, "vote", 0.85)
    assert k.tolist() == [2.0, 0.0]  # channel 1's mode (k=1) lacks 85 % agreement -> 0
    assert share[0] == pytest.approx(0.9)
    k_mse, _ = select_exponents(e, "mse", 0.85)
    assert k_mse.tolist() == [2.0, 3.0]  # summed error: k=1 gives 9.0, k=3 gives 6.0
    # the shift budget keeps shifted weight codes inside INT8
    assert [pts_budget(QuantFormat(bits=b, granularity=PerAxis(0))) for b in (4, 5, 6, 8)] == [3, 3, 2, 0]


def test_les_scales_positive_shared_per_tensor_and_keep_the_fp_function(calib_cache):
    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    recipe = load_recipe("dmq", {"les": {"iters": 30, "samples": 16, "lr": 0.05}, "minmax": FAST["minmax"]})
    recipe.passes = [p for p in recipe.passes if p[0] in ("les", "minmax")]
    plan = quantize(d, recipe, calib, bits="w4a8", progress=False)
    smooth = {
        lp.name: lp.sites["input"].multiplier
        for lp in plan.quantized_layers()
        if lp.act and lp.sites["input"].multiplier is not None
    }
    assert set(smooth) == {lp.name for lp in plan.quantized_layers() if lp.act and lp.weight}
    assert all(bool((m > 0).all()) for m in smooth.values())
    assert all(not torch.equal(m, torch.ones_like(m)) for m in smooth.values())  # training moved every tau
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert torch.equal(smooth[f"{blk}.attn1.to_q"], smooth[f"{blk}.attn1.to_k"]) and torch.equal(
        smooth[f"{blk}.attn1.to_q"], smooth[f"{blk}.attn1.to_v"]
    )
    assert torch.equal(
        smooth[f"{blk}.attn2.to_k"], smooth["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
    )  # the conditioning
    # Q(X / tau) . Q(tau * W) without the quantizers is the FP layer
    for name in (f"{blk}.attn1.to_q", "up_blocks.0.resnets.0.conv_shortcut"):
        mod = d.model.get_submodule(name)
        x = torch.randn(2, mod.weight.shape[1], 4, 4) if mod.weight.dim() == 4 else torch.randn(3, mod.weight.shape[1])
        shape = [1, -1, 1, 1] if x.dim() == 4 else [1, -1]
        w = plan.weights[name]
        got = (
            mod._conv_forward(x * smooth[name].reshape(shape), w, mod.bias)
            if x.dim() == 4
            else torch.nn.functional.linear(x * smooth[name], w, mod.bias)
        )
        assert torch.allclose(got, mod(x), atol=1e-4)
    notes = [n for lp in plan.quantized_layers() for n in lp.notes if n.startswith("LES")]
    before = [float(n.split("loss ")[1].split(" ->")[0]) for n in notes]
    after = [float(n.split("-> ")[1].split(" ")[0]) for n in notes]
    assert sum(after) < sum(before)  # LES lowers the dynamic-quant output loss


def test_reconstruct_with_fp_activations_learns_weights_only(calib_cache):
    d = make_tiny_dit()
    calib = tiny_calib(d, calib_cache)
    base = quantize(d, load_recipe("minmax"), calib, bits="w4a8", progress=False)
    rec = load_recipe(
        "qdiffusion", {"reconstruct": {"iters": 10, "samples": 12, "batch_size": 4, "quantize_acts": False}}
    )
    rec.passes = [p for p in rec.passes if p[0] != "shortcut_split"]
    rec.passes[0] = ("minmax", load_recipe("minmax").passes[0][1])
    plan = quantize(d, rec, calib, bits="w4a8", progress=False)
    acts = [k for k in base.sites if ":input" in k]
    assert acts and all(torch.equal(base.sites[k].scale, plan.sites[k].scale) for k in acts)
    assert any(
        not torch.equal(plan.weights[lp.name], d.model.get_submodule(lp.name).weight) for lp in plan.quantized_layers()
    )


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_dmq_lowering_folds_multipliers_shifts_pts_codes_and_keeps_parity(target, dmq_unet, tmp_path):
    d, calib, plan = dmq_unet
    pts = {
        lp.name: plan.pts_exponents(lp.name)
        for lp in plan.quantized_layers()
        if plan.pts_exponents(lp.name) is not None
    }
    # DMQ's default: exactly the decoder ResBlocks' skip convs (input [h, skip]); some channels shifted
    assert pts and all(n.startswith("up_blocks.") and n.endswith("conv_shortcut") for n in pts)
    assert any(bool((k > 0).any()) for k in pts.values())
    plan = QuantPlan.load(plan.save(tmp_path / "plan"))  # PTS exponents survive save/load
    res = export(plan, d, tmp_path / "out", target=target)
    model = onnx.load(str(res.qdq_onnx))
    assert lint(model, target=target).ok
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, k in pts.items():
        codes = inits[f"{name}.weight_quantized"].astype(np.int32)  # S8 weights, zero point 0, on both targets
        assert inits[f"{name}.weight_quantized"].dtype == np.int8
        big = int(k.max())
        assert codes.min() >= -128 and codes.max() <= 127
        expect = (
            fake_quant(plan.weights[name], plan.weight_scale(name), plan.layers[name].weight)
            / plan.weight_scale(name)[:, None, None, None]
        )
        shifted = expect.round() * torch.exp2(big - k)[None, :, None, None]
        assert np.array_equal(codes, shifted.numpy().astype(np.int32))  # n-bit codes << (K - k)
        assert np.allclose(inits[f"{name}.weight_scale"].astype(np.float32), (plan.weight_scale(name) / 2**big).numpy())
        assert "power-of-two" in res.realized[name]["weight"]
    # the multiplier goes into the LayerNorm (Q/K/V share it) and the GroupNorm affine; else one Mul
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.0.proj"):
        assert (
            res.realized[f"{blk}.{n}"]["act_multiplier"].startswith("folded into")
            and "LayerNormalization" in res.realized[f"{blk}.{n}"]["act_multiplier"]
        )
    assert "affine" in res.realized["down_blocks.0.attentions.0.proj_in"]["act_multiplier"]
    assert res.realized["down_blocks.0.resnets.0.conv1"]["act_multiplier"].startswith("one Mul")  # SiLU in between
    muls = {n.name for n in model.graph.node if n.op_type == "Mul"}
    assert f"{blk}.attn1.to_q.act_smooth_Mul" not in muls and "down_blocks.0.resnets.0.conv1.act_smooth_Mul" in muls
    fq = copy.deepcopy(d)
    apply_plan(fq.model, plan, target=target)
    r = check_parity(fq, model, [(ts, calib.at(ts, 4)) for ts in calib.timesteps])
    assert r.max_step_error <= 1.0 and r.weight_max_step_error == 0.0, r.worst_tensors
    assert r.cosine_min > (0.999 if target == "onnxruntime" else 0.99)


def test_pts_is_skipped_where_shifted_codes_would_leave_int8(calib_cache):
    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    plan = quantize(d, load_recipe("dmq", {**FAST, "les": {"iters": 0}}), calib, bits="w8a8", progress=False)
    assert not any(k.endswith(".pts") for k in plan.tensors())
    assert any("PTS skipped: its weight codes leave no room" in n for lp in plan.quantized_layers() for n in lp.notes)


def test_les_refuses_a_second_equivalent_scaling(calib_cache):
    d = make_tiny_dit()
    calib = tiny_calib(d, calib_cache)
    rec = load_recipe("dmq", FAST)
    rec.passes.insert(0, ("smoothquant", load_recipe("modelopt-int8").passes[0][1]))
    with pytest.raises(DiffquantError, match="already scaled"):
        quantize(d, rec, calib, bits="w4a8", progress=False)
