"""The qua2sedimo pass on real tiny denoisers: the searched assignment meets its budget, UAQ lowers
exactly onto the plan's per-channel grids (ONNX Runtime with fusion off matches fake-quant within
one step), k-means layers follow their lowering policy, and the baselines do what they say."""

import copy

import onnx
import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.eval import check_parity
from diffquant.exporters import export, lint
from diffquant.passes import load_recipe, quantize
from diffquant.passes.qua2sedimo.lowering import lower_codebook, lower_uaq
from diffquant.passes.qua2sedimo.options import OptionCache, WeightOption, quantize_option, uaq
from diffquant.passes.qua2sedimo.sensitivity import config_bits, weight_layers
from diffquant.quant import apply_plan
from diffquant.quant.fake import fake_quant
from diffquant.quant.format import PerAxis, QuantFormat
from tests.conftest import make_tiny_dit, make_tiny_unet, tiny_calib

SMALL = {"configs": 24, "holdout": 6, "per_step": 2}


def _plan(d, calib, request="w4a8", **options):
    return quantize(
        d, load_recipe("qua2sedimo", {"qua2sedimo": {**SMALL, **options}}), calib, bits=request, progress=False
    )


def _midway(d) -> float:
    layers = list(weight_layers(d.model))
    cache = OptionCache()
    low, high = (config_bits(d.model, {n: WeightOption("uaq", b) for n in layers}, cache) for b in (3, 4))
    return round((low + high) / 2, 3)


def test_uaq_lowers_exactly_onto_symmetric_grids_widened_only_where_the_zero_point_needs_it():
    w = torch.randn(24, 40) * torch.linspace(0.1, 2.0, 24)[:, None] + torch.linspace(-0.5, 0.5, 24)[:, None]
    for bits in (3, 4):
        new, scale, widths, avg = lower_uaq(w, bits)
        qw = uaq(w, bits)
        fmt = QuantFormat(bits=widths, granularity=PerAxis(0))
        assert torch.equal(fake_quant(new, scale, fmt), new)  # on the grid: the graph's Q/DQ reproduces it
        codes = torch.round(new / scale[:, None])
        assert all(len(torch.unique(r)) <= 2**bits for r in codes)  # 2^b levels per row, as the research form
        fits = [bool(r.min() >= -(2 ** (bits - 1)) and r.max() < 2 ** (bits - 1)) for r in codes]
        assert [b == bits for b in widths] == fits and set(widths) <= {bits, bits + 1} and not all(fits)
        assert all(f for f, z in zip(fits, qw.zero) if z == 2 ** (bits - 1))
        assert (
            qw.zero.min() >= 0 and qw.zero.max() <= 2**bits - 1
        )  # rows off zero (the last ones here) still hold 0 on the grid
        assert avg == pytest.approx(qw.avg_bits())
        assert (new - qw.dequantize()).abs().max() <= (
            scale - qw.scale
        ).abs().max() * 2**bits + 1e-6  # only the FP16 scale rounding moves it


def test_codebook_lowering_keeps_at_most_2_to_the_b_values_per_row_on_an_int8_grid():
    w = torch.randn(16, 64)
    qw = quantize_option(w, WeightOption("kmeans-c", 3))
    new, scale, avg = lower_codebook(qw)
    assert torch.equal(fake_quant(new, scale, QuantFormat(bits=8, granularity=PerAxis(0))), new)
    assert all(len(torch.unique(r)) <= 8 for r in new)
    assert (new - qw.dequantize()).abs().max() <= scale.max() / 2 + 1e-6
    assert avg == pytest.approx(3 + (8 * 16 * 8 + 16 * 16) / w.numel())


@pytest.mark.parametrize("make", [make_tiny_unet, make_tiny_dit], ids=["unet", "dit"])
def test_searched_plan_meets_the_budget_and_the_graph_matches_fake_quant(make, calib_cache, tmp_path):
    d = make()
    calib = tiny_calib(d, calib_cache)
    budget = _midway(d)  # tiny layers: the FP16 overhead is large, so the budget sits between all-3 and all-4 bits
    plan = _plan(d, calib, budget=budget, bits=[3, 4])
    q = plan.recipe["qua2sedimo"]
    assert q["research_bits"] <= budget and q["deployed_bits"] == q["research_bits"]
    assert set(q["assignment"].values()) <= {"uaq-w3", "uaq-w4"} and len(set(q["assignment"].values())) == 2
    assert set(q["assignment"]) == {lp.name for lp in plan.quantized_layers() if lp.weight}
    assert -1 <= q["spearman"] <= 1 and len(q["held_out"]) == SMALL["holdout"]
    res = export(plan, d, tmp_path)
    model = onnx.load(str(res.qdq_onnx))
    assert lint(model).ok
    fq = copy.deepcopy(d)
    apply_plan(fq.model, plan)
    r = check_parity(fq, model, [(ts, calib.at(ts, 4)) for ts in calib.timesteps])
    assert r.weight_max_step_error == 0.0 and r.max_step_error <= 1.0, r.worst_tensors


def test_baselines_and_kmeans_policies(calib_cache):
    d = make_tiny_dit()
    calib = tiny_calib(d, calib_cache)
    uniform = _plan(d, calib, request="w4a6", search="uniform", uniform=3)  # A6 selectable by the request
    assert set(uniform.recipe["qua2sedimo"]["assignment"].values()) == {"uaq-w3"} and uniform.bits.act_bits == (6,)
    for search in ("random", "largest-first"):
        q = _plan(d, calib, search=search, budget=_midway(d), bits=[3, 4]).recipe["qua2sedimo"]
        assert _midway(d) - 0.5 < q["research_bits"] <= _midway(d)
    largest = _plan(d, calib, search="largest-first", budget=_midway(d), bits=[3, 4])
    low = {n for n, o in largest.recipe["qua2sedimo"]["assignment"].items() if o == "uaq-w3"}
    order = sorted(
        (lp.name for lp in largest.quantized_layers() if lp.weight), key=lambda n: -largest.layers[n].weight_numel
    )
    assert low and low == set(order[: len(low)])  # the largest layers, and only they, went down to 3 bits
    research = {"methods": ["kmeans-a"], "bits": [3, 4], "budget": 6.0}
    fp16 = _plan(d, calib, kmeans_lowering="fp16", **research)
    assert (
        all(lp.weight_site is None for lp in fp16.quantized_layers())
        and fp16.recipe["qua2sedimo"]["deployed_bits"] == 16.0
    )
    book = _plan(d, calib, kmeans_lowering="codebook", **research)
    assert all(lp.weight.bits == 8 for lp in book.quantized_layers() if lp.weight)
    regrid = _plan(d, calib, kmeans_lowering="regrid", **research)
    assert all(lp.weight.max_bits <= 5 for lp in regrid.quantized_layers() if lp.weight)


def test_bad_settings_are_refused_naming_the_option(tiny_dit, calib_cache):
    calib = tiny_calib(tiny_dit, calib_cache)
    for bad in (
        {"budget": 1.0},
        {"bits": [4, 3]},
        {"bits": [3, 8]},
        {"methods": ["gptq"]},
        {"search": "anneal"},
        {"holdout": 24},
    ):
        with pytest.raises(DiffquantError, match="qua2sedimo"):
            load_recipe("qua2sedimo", {"qua2sedimo": {**SMALL, **bad}})
    with pytest.raises(DiffquantError, match="no assignment fits"):
        _plan(tiny_dit, calib, budget=3.0, bits=[3, 4])


def test_a_qua2sedimo_plan_carries_its_sensitivity_report(tiny_unet, calib_cache, tmp_path):
    from diffquant.passes.qua2sedimo.report import report_from_plan, write_report
    from diffquant.quant import QuantPlan

    calib = tiny_calib(tiny_unet, calib_cache)
    plan = _plan(tiny_unet, calib, budget=_midway(tiny_unet), bits=[3, 4])
    plan.save(tmp_path / "plan")
    rep = report_from_plan(QuantPlan.load(tmp_path / "plan"))  # from the saved plan, as a run writes it
    assert {r["name"] for r in rep.layers} == set(plan.recipe["qua2sedimo"]["assignment"])
    assert [f.held for f in rep.findings][1] is not None  # a U-Net: the ResBlock finding is testable
    md = write_report(rep, tmp_path / "rep")[0].read_text()
    assert "## The paper's findings, checked" in md and "uaq-w3" in md
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == [
        f"sensitivity_{k}.png" for k in ("assignment", "blocks", "layers", "op_types", "predictor")
    ]
    assert report_from_plan(_plan(tiny_unet, calib, search="uniform")) is None
