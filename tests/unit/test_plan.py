"""QuantPlan round trip, replay on a fresh model, and lifecycle checks."""

import copy

import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.passes import load_recipe, quantize
from diffquant.quant import QuantPlan, apply_plan, quant_modules
from tests.conftest import make_tiny_unet, tiny_calib


@pytest.fixture(scope="module")
def plan_and_model(calib_cache):
    d = make_tiny_unet()
    plan = quantize(d, load_recipe("minmax"), tiny_calib(d, calib_cache), bits="w4a8", progress=False)
    return plan, d


def test_plan_round_trip(plan_and_model, tmp_path):
    plan, _ = plan_and_model
    plan.save(tmp_path / "p")
    back = QuantPlan.load(tmp_path / "p")
    assert back.to_json() == plan.to_json()
    assert set(back.tensors()) == set(plan.tensors())
    for k, v in plan.tensors().items():
        assert torch.equal(back.tensors()[k], v)
    assert back.state == "frozen" and back.request == "w4a8" and back.bits == plan.bits


def test_replay_on_fresh_model_matches(plan_and_model, tmp_path):
    plan, d = plan_and_model
    plan.save(tmp_path / "p")
    inp = d.example_inputs(2)
    a = copy.deepcopy(d)
    apply_plan(a.model, plan)
    fresh = make_tiny_unet()  # same seed -> same FP weights, built anew
    apply_plan(fresh.model, QuantPlan.load(tmp_path / "p"))
    with torch.no_grad():
        assert torch.equal(a(**inp), fresh(**inp))
        # and the fake-quant model really differs from FP
        assert not torch.allclose(a(**inp), d(**inp), atol=1e-6)
    qm = quant_modules(fresh.model)
    assert set(qm) == {lp.name for lp in plan.quantized_layers()}
    for name, m in qm.items():
        # weights on the 4-bit grid, activations on the 8-bit grid
        q = torch.round(m.quant_weight() / m.weight_scale.reshape(-1, *([1] * (m.weight.dim() - 1))))
        assert q.min() >= -8 and q.max() <= 7, name


def test_plan_refuses_other_weights_and_unfrozen(plan_and_model):
    plan, _ = plan_and_model
    other = make_tiny_unet(seed=1)
    with pytest.raises(DiffquantError, match="quantize this model again"):
        apply_plan(other.model, plan)
    p2 = copy.copy(plan)
    p2.state = "calibrating"
    with pytest.raises(DiffquantError, match="not frozen"):
        apply_plan(make_tiny_unet().model, p2)


def test_plan_skips_default_layers(plan_and_model):
    plan, _ = plan_and_model
    assert "conv_in" in plan.skipped and "conv_out" in plan.skipped
    assert plan.skipped["conv_in"].startswith("default-skip")
    assert not any("time_emb_proj" in n for n in plan.layers)


def test_siblings_share_one_activation_scale(plan_and_model):
    plan, _ = plan_and_model
    groups: dict[str, set] = {}
    for lp in plan.quantized_layers():
        groups.setdefault(lp.input_group, set()).add(float(plan.act_scale(lp.name)))
    to_q = [n for n in plan.layers if n.endswith("attn1.to_q")][0]
    to_k = to_q.replace("to_q", "to_k")
    assert plan.layers[to_q].input_group == plan.layers[to_k].input_group
    assert all(len(s) == 1 for s in groups.values())


def test_corrupt_plan_files(tmp_path):
    (tmp_path / "plan.json").write_text("{not json")
    (tmp_path / "plan.safetensors").write_bytes(b"garbage")
    with pytest.raises(DiffquantError, match="not valid JSON"):
        QuantPlan.load(tmp_path)
    with pytest.raises(DiffquantError, match="no plan"):
        QuantPlan.load(tmp_path / "missing")
