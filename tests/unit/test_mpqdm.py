"""MPQ-DM: OMQ's per-channel bit widths, their INT8-container lowering and linter check,
EfficientDM's merged LoRA, and TRD's gradient (kept vs detached as released)."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from diffquant.exporters import export, lint
from diffquant.exporters.linter import declared_limits
from diffquant.passes import load_recipe, quantize
from diffquant.passes.context import PassContext
from diffquant.passes.efficientdm import Distiller, EfficientDMConfig, trd_loss
from diffquant.passes.omq import channel_bits, kurtosis
from diffquant.quant import apply_plan
from tests.conftest import make_tiny_unet, tiny_calib

FAST = {"omq": {"samples": 16}, "efficientdm": {"iters": 6, "steps": 3, "batch_size": 2, "rank": 4}}


def test_kurtosis_ranks_outlier_channels_and_bits_average_to_n():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 20000, generator=gen)
    w[1, :20] = 40.0  # a few large outliers
    k = kurtosis(w)
    assert k[0] == pytest.approx(3.0, abs=0.15) and k[1] > 10 * k[0]
    order = torch.argsort(k, descending=True)
    for n in (2, 3, 4):
        for g in range(6):
            bits = channel_bits(torch.arange(60), n, g, 6)
            assert sum(bits) == 60 * n and bits[: g * 6] == (n + 1,) * (g * 6)
    assert int(order[0]) == 1


@pytest.fixture(scope="module")
def mixed(calib_cache):
    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    return (
        d,
        calib,
        quantize(
            d,
            load_recipe("mpqdm", {**FAST, "omq": {"samples": 16, "search": "full"}}),
            calib,
            bits="w3a4",
            timestep_groups=1,
            progress=False,
        ),
    )


def test_omq_gives_mixed_channels_that_average_to_n(mixed):
    _, _, plan = mixed
    omq = [lp for lp in plan.quantized_layers() if lp.weight and lp.weight.mixed]
    assert omq, "OMQ chose g = 0 everywhere on the tiny model"
    for lp in omq:
        assert set(lp.weight.bits) == {2, 3, 4} and lp.weight.mean_bits == 3.0
    eight = [lp for lp in plan.quantized_layers() if lp.name in ("conv_in", "conv_out") or "time_emb" in lp.name]
    assert eight and all(lp.weight.bits == 8 and lp.act.bits == 8 for lp in eight)
    assert next(r for r in plan.reports if r.pass_name == "omq").rows


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_mixed_grids_lower_in_int8_keep_parity_and_are_linted(mixed, tmp_path, target):
    from diffquant.calib_data.collect import pick_inputs
    from diffquant.eval import check_parity

    d, calib, plan = mixed
    res = export(plan, d, tmp_path / "out", target=target)
    model = onnx.load(str(res.qdq_onnx))
    assert lint(model, target=target).ok
    inits = {i.name: i for i in model.graph.initializer}
    lp = next(
        lp for lp in plan.quantized_layers() if lp.weight and lp.weight.mixed and lp.op == "conv" and not lp.split
    )
    codes = numpy_helper.to_array(inits[f"{lp.name}.weight_quantized"]).astype(np.int32)
    lo, hi = declared_limits("".join(map(str, lp.weight.bits)))
    flat = codes.reshape(len(codes), -1)
    assert (flat.min(1) >= lo).all() and (flat.max(1) <= hi).all()
    narrow = [c for c in range(len(flat)) if lp.weight.bits[c] == 2]
    assert narrow and all(set(np.unique(flat[c])) <= {-2, -1, 0, 1} for c in narrow)
    fq = copy.deepcopy(d)
    apply_plan(fq.model, plan, target=target)
    r = check_parity(fq, model, pick_inputs(calib, 2, 2))
    assert r.max_step_error <= 1.0 and r.weight_max_step_error == 0.0, r.worst_tensors
    # a code outside its channel's declared grid is caught
    bad = codes.copy()
    c = int(np.argmin(lp.weight.bits))
    bad.reshape(len(bad), -1)[c, 0] = 3
    inits[f"{lp.name}.weight_quantized"].CopyFrom(
        numpy_helper.from_array(bad.astype(np.int8), f"{lp.name}.weight_quantized")
    )
    rep = lint(model, target=target)
    assert "weight-code-range" in rep.rules() and f"channel {c}" in str(rep.violations[0])


def test_lora_is_merged_and_the_graph_has_no_lora_branch(mixed, tmp_path):
    d, calib, plan = mixed
    changed = [n for n, w in plan.weights.items() if not torch.equal(w, d.model.get_submodule(n).weight)]
    assert changed  # W + BA, re-quantized with the learned step
    ranges_only = load_recipe("mpqdm")
    ranges_only.passes = ranges_only.passes[:1]  # the same layers and formats, minmax only
    base = quantize(d, ranges_only, calib, bits="w3a4", timestep_groups=1, progress=False)
    ops = lambda p, name: sorted(n.op_type for n in onnx.load(str(export(p, d, tmp_path / name).qdq_onnx)).graph.node)  # noqa: E731
    assert ops(plan, "mpqdm") == ops(base, "base")


@pytest.mark.parametrize("mode", ["on", "detached"])
def test_trd_gradient_reaches_lora_and_steps_only_when_kept(mixed, mode):
    d, calib, _ = mixed
    plan = quantize(d, load_recipe("minmax"), calib, bits="w3a4", progress=False)
    plan.state = "calibrating"
    dist = Distiller(PassContext(d, plan, calib, progress=False), EfficientDMConfig(trd=mode, rank=4))
    try:
        inputs = d.example_inputs(2)
        with torch.no_grad():
            d(**inputs)
        dist.qd(**inputs)
        prev = {k: v.detach() for k, v in dist.feats.items()}
        with torch.no_grad():
            d(**d.example_inputs(2, seed=1))
        dist.qd(**d.example_inputs(2, seed=1))
        loss = dist.trd_term(prev)
        assert float(loss) > 0
        if mode == "detached":
            assert not loss.requires_grad  # the released code's TRD changes no gradient
            return
        loss.backward()
        b_grads = [float(lo.b.grad.abs().sum()) for lo in dist.loras.values() if lo.b.grad is not None]
        assert b_grads and max(b_grads) > 0
        act = [float(p.grad.abs().sum()) for p in dist.act_steps.values() if p.grad is not None]
        w = [float(p.grad.abs().sum()) for p in dist.weight_steps.values() if p.grad is not None]
        assert act and max(act) > 0 and w and max(w) > 0
    finally:
        dist.close()


def test_trd_loss_is_zero_for_equal_relations_and_positive_otherwise():
    f = torch.randn(2, 8, 4, 4)
    assert float(trd_loss(f, f)) == pytest.approx(0.0, abs=1e-5)
    assert float(trd_loss(f, torch.randn(2, 8, 4, 4))) > 0
    assert float(trd_loss(f, 3 * f)) == pytest.approx(0.0, abs=1e-5)  # channel scale does not matter


def test_recipe_sets_timestep_groups_and_8bit_sensitive_layers(calib_cache):
    d = make_tiny_unet()
    calib = tiny_calib(d, calib_cache)
    recipe = load_recipe("efficientdm", {"efficientdm": {"iters": 0}})
    assert recipe.timestep_groups == 4 and recipe.default_skip_bits == "w8a8"
    recipe.timestep_groups = len(calib.timesteps)
    plan = quantize(d, recipe, calib, progress=False)  # no explicit groups: the recipe's
    assert plan.n_groups == len(calib.timesteps)
    assert all(s.scale.numel() == plan.n_groups for lp in plan.quantized_layers() for s in lp.input_sites)
    assert plan.layers["conv_in"].rule.startswith("default-w8a8") and plan.layers["conv_in"].weight.bits == 8
    assert plan.bits.act_bits == (4, 8) and 2 < plan.bits.weight_bits < 8
