"""The reconstruction pass: AdaRound rounding, LSQ step sizes, block/layer units, pluggable
timestep weights, checkpoint and resume."""

import copy

import pytest
import torch

from diffquant.passes import load_recipe, quantize
from diffquant.passes.observe.weighting import TIMESTEP_WEIGHTINGS, UniformWeighting
from diffquant.passes.reconstruct import AdaRound
from diffquant.quant import apply_plan
from diffquant.quant.fake import fake_quant
from diffquant.quant.format import PerAxis, QuantFormat
from tests.conftest import make_tiny_dit, make_tiny_unet, tiny_calib

FAST = {"iters": 40, "samples": 24, "batch_size": 8}


def test_adaround_starts_at_the_fp_weight_and_hardens_onto_the_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    fmt = QuantFormat(bits=4, granularity=PerAxis(0))
    scale = w.abs().amax(dim=1) / fmt.qmax
    r = AdaRound(w, scale, fmt)
    assert torch.allclose(r.soft(), w, atol=1e-5)  # h(V) = fractional part: soft weight is W
    codes = r.hard() / scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    # hard rounding is floor or ceil of W/s, never further
    assert ((codes - w / scale[:, None]).abs() <= 1.0 + 1e-5).all()
    # the regularizer is largest at h = 1/2 and 0 once every h is 0 or 1
    with torch.no_grad():
        r.v.fill_(10.0)
    assert float(r.regularizer(2.0)) == pytest.approx(0.0, abs=1e-6)


def _output_error(d, plan, calib) -> float:
    fq = copy.deepcopy(d)
    apply_plan(fq.model, plan)
    err = 0.0
    with torch.no_grad():
        for ts in calib.timesteps:
            inp = calib.at(ts, 8)
            err += float((fq(**inp) - d(**inp)).pow(2).mean())
    return err


@pytest.mark.parametrize("make", [make_tiny_unet, make_tiny_dit], ids=["unet", "dit"])
def test_reconstruction_beats_nearest_rounding(make, calib_cache, tmp_path):
    d = make()
    calib = tiny_calib(d, calib_cache)
    base = quantize(
        d,
        load_recipe(
            "qdiffusion",
            {
                "reconstruct": {
                    **FAST,
                    "iters": 1,
                    "learn_act_scales": False,
                    "round_weight": 0.0,
                    "warmup": 0.0,
                    "lr": 0.0,
                }
            },
        ),
        calib,
        bits="w4a8",
        progress=False,
    )
    rec = quantize(
        d, load_recipe("qdiffusion", {"reconstruct": {**FAST, "iters": 150}}), calib, bits="w4a8", progress=False
    )
    # the rounded weights are on the plan's grid and the notes say what each unit gained
    for lp in rec.quantized_layers():
        if lp.weight:
            w = rec.weights[lp.name]
            assert torch.equal(fake_quant(w, rec.weight_scale(lp.name), lp.weight), w)
        assert any(n.startswith("reconstructed in unit") for n in lp.notes)
    assert _output_error(d, rec, calib) < _output_error(d, base, calib)


def test_layer_granularity_makes_one_unit_per_layer(tiny_dit, calib_cache):
    calib = tiny_calib(tiny_dit, calib_cache)
    plan = quantize(
        tiny_dit,
        load_recipe("qdiffusion", {"reconstruct": {**FAST, "granularity": "layer", "iters": 5}}),
        calib,
        bits="w4a8",
        progress=False,
    )
    units = {
        n.split("unit ")[1].split(":")[0]
        for lp in plan.quantized_layers()
        for n in lp.notes
        if "reconstructed in unit" in n
    }
    assert units == {lp.name for lp in plan.quantized_layers()}


class _Recorder(UniformWeighting):
    """Uniform weights; records what it was given, and can stop the run after some calls."""

    seen: list = []
    stop_after: int | None = None

    def weights(self, t):
        _Recorder.seen.append(t.clone())
        if _Recorder.stop_after is not None and len(_Recorder.seen) >= _Recorder.stop_after:
            raise KeyboardInterrupt
        return super().weights(t)


def test_checkpoint_resume_gives_the_same_plan(tiny_unet, calib_cache, tmp_path, monkeypatch):
    monkeypatch.setitem(TIMESTEP_WEIGHTINGS, "recorder", _Recorder)
    calib = tiny_calib(tiny_unet, calib_cache)
    cfg = {**FAST, "iters": 10, "timestep_weighting": "recorder", "checkpoint_dir": str(tmp_path / "ckpt")}
    recipe = load_recipe("qdiffusion", {"reconstruct": cfg})
    _Recorder.seen, _Recorder.stop_after = [], None
    full = quantize(tiny_unet, recipe, calib, bits="w4a8", progress=False)
    # the pluggable weighting saw every iteration's batch timesteps, all calibration timesteps
    assert {float(v) for t in _Recorder.seen for v in t} == set(calib.timesteps)
    n_units = len(_Recorder.seen) // 10
    assert n_units >= 4
    import shutil

    shutil.rmtree(tmp_path / "ckpt")
    _Recorder.seen, _Recorder.stop_after = [], 25  # stopped inside the third unit
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_unet, recipe, calib, bits="w4a8", progress=False)
    _Recorder.seen, _Recorder.stop_after = [], None
    resumed = quantize(tiny_unet, recipe, calib, bits="w4a8", progress=False)
    assert len(_Recorder.seen) == (n_units - 2) * 10  # two units came from the checkpoint
    a, b = full.tensors(), resumed.tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_reconstruct_needs_scales_first(tiny_dit, calib_cache, tmp_path):
    from diffquant.errors import DiffquantError
    from diffquant.passes.recipes import Recipe

    calib = tiny_calib(tiny_dit, calib_cache)
    r = load_recipe("qdiffusion")
    bad = Recipe(name="bad", targeting=r.targeting, passes=[p for p in r.passes if p[0] == "reconstruct"])
    with pytest.raises(DiffquantError, match="run a range pass"):
        quantize(tiny_dit, bad, calib, bits="w4a8", progress=False)
