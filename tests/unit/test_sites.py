"""Typed quantizer sites: keys, mixed per-channel formats, per-layer formats from targeting
rules, the derived bit summary, pass reports, and refusal of research-only grids at export."""

import copy

import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.exporters import export
from diffquant.passes import load_recipe, quantize
from diffquant.quant import PerAxis, PerTensor, QuantFormat, QuantPlan, Rule, Site, SiteKey
from diffquant.quant.fake import fake_quant, quantize_int
from tests.conftest import make_tiny_unet, tiny_calib


def test_site_keys_round_trip_and_reject_unknown_roles():
    for text in ("down.0.conv:weight", "up.1.skip:input#1", "mid.attn:operand#2", "x:output"):
        assert str(SiteKey.parse(text)) == text
    assert SiteKey.parse("a.b:input#1").local == "input#1"
    with pytest.raises(DiffquantError, match="role"):
        SiteKey("a", "bias")
    with pytest.raises(DiffquantError, match="module:role"):
        SiteKey.parse("no-role")


def test_mixed_bits_grid_per_channel():
    fmt = QuantFormat(bits=(1, 2, 3, 8), granularity=PerAxis(0))
    assert fmt.mixed and fmt.max_bits == 8 and fmt.mean_bits == 3.5
    assert QuantFormat.from_dict(fmt.to_dict()) == fmt
    x = torch.linspace(-300, 300, 41).repeat(4, 1)
    q = quantize_int(x, torch.ones(4), fmt)
    assert set(q[0].tolist()) == {-1.0, 1.0}  # one bit: two levels, the sign
    assert q[1].min() == -2 and q[1].max() == 1
    assert q[2].min() == -4 and q[2].max() == 3
    assert q[3].min() == -128 and q[3].max() == 127
    # STE keeps gradients inside each channel's own range only
    xg = x.clone().requires_grad_(requires_grad=True)
    fake_quant(xg, torch.ones(4), fmt, ste=True).sum().backward()
    assert xg.grad[2].sum() == ((x[2] >= -4) & (x[2] <= 3)).sum()
    with pytest.raises(DiffquantError, match="per-axis"):
        QuantFormat(bits=(2, 3), granularity=PerTensor())
    with pytest.raises(DiffquantError, match="1..8"):
        QuantFormat(bits=(2, 9), granularity=PerAxis(0))


@pytest.fixture(scope="module")
def mixed_plan(calib_cache):
    d = make_tiny_unet()
    recipe = load_recipe("minmax")
    recipe.targeting = [*recipe.targeting, Rule(pattern="conv_in", bits="w8a8", name="first conv at 8 bits")]
    recipe.use_default_skip = False
    return d, quantize(d, recipe, tiny_calib(d, calib_cache), bits="w4a8", progress=False)


def test_rule_formats_set_bits_per_layer_and_bits_is_derived(mixed_plan, tmp_path):
    d, plan = mixed_plan
    assert plan.layers["conv_in"].weight.bits == 8 and plan.layers["conv_in"].rule == "first conv at 8 bits"
    others = [lp for n, lp in plan.layers.items() if n != "conv_in" and lp.weight]
    assert others and all(lp.weight.bits == 4 for lp in others)
    b = plan.bits
    numel = {lp.name: lp.weight_numel for lp in plan.quantized_layers() if lp.weight}
    expect = (8 * numel["conv_in"] + 4 * (sum(numel.values()) - numel["conv_in"])) / sum(numel.values())
    assert b.request == "w4a8" and b.weight_bits == pytest.approx(expect)
    assert b.weight_bits_with_scales > b.weight_bits and b.act_bits == (8,)
    back = QuantPlan.load(plan.save(tmp_path / "p"))
    assert back.bits == b and set(back.sites) == set(plan.sites)


def test_log2_grid_is_powers_of_two_in_fake_quant_only():
    fmt = QuantFormat(bits=3, kind="log2")
    x = torch.tensor([1.0, 0.6, 0.26, -0.13, 0.001, 0.0])
    y = fake_quant(x, torch.tensor(1.0), fmt)
    assert y.tolist() == pytest.approx([1.0, 0.5, 0.25, -0.125, 0.0, 0.0])
    with pytest.raises(DiffquantError, match="research only"):
        quantize_int(x, torch.tensor(1.0), fmt)


def test_research_only_sites_do_not_lower(mixed_plan, tmp_path):
    d, plan = mixed_plan
    bad = plan.copy()
    site: Site = bad.layers["conv_in"].sites["input"]
    site.format = QuantFormat(bits=8, kind="log2")
    assert site.format.research_only
    with pytest.raises(DiffquantError, match="conv_in:input has a log2 grid, which is research only"):
        export(bad, copy.deepcopy(d), tmp_path / "out")
    assert not (tmp_path / "out" / "unet.qdq.onnx").exists()


def test_passes_leave_reports(calib_cache):
    d = make_tiny_unet()
    fast = {"reconstruct": {"iters": 2, "samples": 16, "batch_size": 8}}
    plan = quantize(d, load_recipe("qdiffusion", fast), tiny_calib(d, calib_cache), bits="w4a8", progress=False)
    rep = next(r for r in plan.reports if r.pass_name == "reconstruct")
    assert len(rep.rows) >= 2 and all(len(r) == len(rep.columns) for r in rep.rows)
    assert "| unit | layers |" in rep.markdown()
