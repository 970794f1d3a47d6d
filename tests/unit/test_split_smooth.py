"""Shortcut split and SmoothQuant: plan, fake-quant, lowering, linter and parity; the
`qdiffusion` and `modelopt-int8` recipes end to end on tiny models."""

import copy

import onnx
import pytest
import torch

from diffquant.cli import parse_overrides
from diffquant.errors import DiffquantError
from diffquant.eval import check_parity
from diffquant.exporters import export, lint
from diffquant.passes import load_recipe, quantize
from diffquant.passes.observe.activations import ActStats
from diffquant.quant import QuantPlan, apply_plan
from tests.conftest import make_tiny_dit, make_tiny_unet, tiny_calib

FAST = {"reconstruct": {"iters": 5, "samples": 12, "batch_size": 4}}


def _parity(d, plan, path, calib, target="tensorrt"):
    fq = copy.deepcopy(d)
    apply_plan(fq.model, plan, target=target)
    return check_parity(fq, onnx.load(str(path)), [(ts, calib.at(ts, 4)) for ts in calib.timesteps])


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_shortcut_split_two_quantizers_lowered_per_concat_input(target, calib_cache, tmp_path):
    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    plan = quantize(d, load_recipe("qdiffusion", FAST), calib, bits="w8a8", progress=False)
    split = {lp.name: lp.split for lp in plan.quantized_layers() if lp.split}
    # exactly the decoder ResBlocks' skip convs read [h, skip]; h has the decoder's channels
    assert split and all(n.startswith("up_blocks.") and n.endswith("conv_shortcut") for n in split)
    for name, s in split.items():
        conv = d.model.get_submodule(name)
        assert 0 < s < conv.in_channels
        assert plan.act_scale(name, half=1) != plan.act_scale(name)
    plan2 = QuantPlan.load(plan.save(tmp_path / "plan"))  # the split survives save/load
    assert {n: plan2.layers[n].split for n in split} == split
    res = export(plan, d, tmp_path / "out", target=target)
    model = onnx.load(str(res.qdq_onnx))
    assert lint(model, target=target).ok
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    for name in split:
        # lowered exactly as two convs (one per concat input, each reading its own DQ) + Add
        convs = [n for n in model.graph.node if n.op_type == "Conv" and n.output[0] in nodes[f"{name}.split_Add"].input]
        assert len(convs) == 2
        assert all(producers[c.input[0]].op_type == "DequantizeLinear" for c in convs)
        assert all(producers[c.input[1]].op_type == "DequantizeLinear" for c in convs)
    r = _parity(d, plan, res.qdq_onnx, calib, target)
    assert r.max_step_error <= 1.0, r.worst_tensors
    # FP32 graph: end to end close; FP16 graph: FP16 arithmetic moves some inputs across
    # rounding boundaries (see the contract test), so only close
    assert r.cosine_min > (0.999 if target == "onnxruntime" else 0.99)


def test_split_half_shared_with_another_reader_gets_one_qdq(calib_cache, tmp_path):
    # the skip tensor of a UNet also feeds the next down layer: one Q/DQ, one scale
    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    plan = quantize(d, load_recipe("qdiffusion", FAST), calib, bits="w8a8", progress=False)
    res = export(plan, d, tmp_path, target="tensorrt")
    shared = [
        info
        for info in res.act_dq.values()
        if len(set(info["layers"])) > 1 and any(plan.layers[n].split for n in info["layers"])
    ]
    assert shared, "expected a skip tensor read by a split layer and another quantized layer"
    model = onnx.load(str(res.qdq_onnx))
    q_inputs = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_inputs) == len(set(q_inputs))


def test_smoothquant_shares_one_vector_per_tensor_and_keeps_the_fp_function(tiny_unet, calib_cache):
    calib = tiny_calib(tiny_unet, calib_cache)
    plan = quantize(tiny_unet, load_recipe("modelopt-int8"), calib, progress=False)
    smooth = {
        lp.name: lp.sites["input"].multiplier
        for lp in plan.quantized_layers()
        if lp.act and lp.sites["input"].multiplier is not None
    }
    smoothed = set(smooth)
    assert smoothed and all(plan.layers[n].op == "linear" for n in smoothed)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    for sib in ("to_k", "to_v"):
        assert torch.equal(smooth[q], smooth[q.replace("to_q", sib)])
    # equivalent scaling alone (no rounding) leaves every smoothed layer's output unchanged
    x = torch.randn(5, smooth[q].numel())
    for n in smoothed:
        lin = tiny_unet.model.get_submodule(n)
        m = smooth[n]
        if m.numel() != x.shape[1]:
            continue
        y = torch.nn.functional.linear(x * m, plan.weights[n], lin.bias)
        assert torch.allclose(y, lin(x), atol=1e-4, rtol=1e-4)
    # their skip list: conv_shortcut and the time embedding stay FP
    assert all(
        "conv_shortcut" in n or "time_emb" in n or n in ("conv_in", "conv_out")
        for n in plan.skipped
        if "conv_shortcut" in n or "time_emb" in n
    )
    assert any("conv_shortcut" in n for n in plan.skipped)


@pytest.mark.parametrize("make", [make_tiny_unet, make_tiny_dit], ids=["unet", "dit"])
def test_modelopt_int8_lowers_with_mul_before_q_and_keeps_parity(make, calib_cache, tmp_path):
    d = make()
    calib = tiny_calib(d, calib_cache)
    plan = quantize(d, load_recipe("modelopt-int8"), calib, progress=False)
    res = export(plan, d, tmp_path)
    model = onnx.load(str(res.qdq_onnx))
    assert lint(model).ok
    muls = [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith(".act_smooth_Mul")]
    assert muls
    consumers = {i: n for n in model.graph.node for i in n.input}
    assert all(consumers[m.output[0]].op_type == "QuantizeLinear" for m in muls)
    r = _parity(d, plan, res.qdq_onnx, calib)
    assert r.max_step_error <= 1.0, r.worst_tensors


def test_min_mean_reduction():
    s = ActStats()
    s.sample_amax["x"][1.0] = [2.0, 4.0]  # mean 3
    s.sample_amax["x"][2.0] = [1.0, 9.0]  # mean 5
    s.amax["x"] = {1.0: 4.0, 2.0: 9.0}
    assert s.reduced_amax("x", "min-mean") == 3.0
    assert s.reduced_amax("x", "max") == 9.0
    assert s.reduced_amax("x", "min-mean", [2.0]) == 5.0


def test_set_overrides_parse_and_reach_the_recipe():
    o = parse_overrides(["reconstruct.iters=7", "reconstruct.inputs=fp", "minmax.act_range=mse"])
    assert o == {"reconstruct": {"iters": 7, "inputs": "fp"}, "minmax": {"act_range": "mse"}}
    r = load_recipe("qdiffusion", o)
    cfg = dict(r.passes)["reconstruct"]
    assert (cfg.iters, cfg.inputs) == (7, "fp")
    with pytest.raises(DiffquantError, match="PASS.OPTION=VALUE"):
        parse_overrides(["iters=7"])
    with pytest.raises(DiffquantError, match="unknown option"):
        load_recipe("qdiffusion", {"reconstruct": {"itres": 3}})
