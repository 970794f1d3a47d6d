"""Qua2SeDiMo's random configurations and their fidelity scores on a real (tiny) denoiser."""

import torch

from diffquant.passes.qua2sedimo.options import METHODS, OptionCache, WeightOption
from diffquant.passes.qua2sedimo.sensitivity import (
    SampleProbe,
    apply_config,
    config_bits,
    sample_configs,
    score_config,
    weight_layers,
)
from tests.conftest import tiny_calib


def test_configurations_are_drawn_as_the_paper_draws_them(tiny_unet):
    layers = list(weight_layers(tiny_unet.model))
    configs = sample_configs(layers, 200, seed=3)
    assert configs == sample_configs(layers, 200, seed=3) and configs != sample_configs(layers, 200, seed=4)
    assert all(set(c) == set(layers) for c in configs)
    low = [sum(o.bits == 3 for o in c.values()) / len(layers) for c in configs]
    assert min(low) < 0.2 and max(low) > 0.8 and 0.35 < sum(low) / len(low) < 0.65  # p ~ U(0, 1) per configuration
    assert {o.method for c in configs for o in c.values()} == set(METHODS)


def test_fewer_bits_score_lower_and_the_original_is_untouched(tiny_unet, calib_cache):
    calib = tiny_calib(tiny_unet, calib_cache)
    cache = OptionCache()
    layers = list(weight_layers(tiny_unet.model))
    before = {n: m.weight.clone() for n, m in weight_layers(tiny_unet.model).items()}
    w4 = {n: WeightOption("uaq", 4) for n in layers}
    w3 = {n: WeightOption("uaq", 3) for n in layers}
    s4, s3 = score_config(tiny_unet, w4, cache, calib), score_config(tiny_unet, w3, cache, calib)
    assert s4.snr_db > s3.snr_db > 0
    assert 4.0 < s4.avg_bits < 5.0 and 3.0 < s3.avg_bits < s4.avg_bits
    assert s4.avg_bits == config_bits(tiny_unet.model, w4, cache)
    assert all(torch.equal(before[n], m.weight) for n, m in weight_layers(tiny_unet.model).items())
    q = apply_config(tiny_unet, w3, cache)
    name = layers[0]
    assert torch.equal(weight_layers(q.model)[name].weight, cache.get(before[name], w3[name]).dequantize())


def test_the_sample_probe_scores_whole_samples_from_the_calibration_seeds(tiny_unet, calib_cache):
    calib = tiny_calib(tiny_unet, calib_cache)
    probe = SampleProbe.build(tiny_unet, calib, 3)
    assert probe.reference.shape == (3, *tiny_unet.sample_shape) and probe.sampler.steps == calib.config.steps
    assert torch.equal(
        probe.batch.noise,
        torch.randn(3, *tiny_unet.sample_shape, generator=torch.Generator().manual_seed(calib.config.seed)),
    )
    assert probe.score(tiny_unet) == 100.0  # the FP model reproduces its own samples (PSNR capped)
    cache, layers = OptionCache(), list(weight_layers(tiny_unet.model))
    s4, s3 = (
        score_config(tiny_unet, {n: WeightOption("uaq", b) for n in layers}, cache, calib, probe=probe) for b in (4, 3)
    )
    assert 100.0 > s4.sample_psnr > s3.sample_psnr > 0
    assert score_config(tiny_unet, {n: WeightOption("uaq", 4) for n in layers}, cache, calib).sample_psnr is None


def test_every_layer_of_both_builtin_models_has_an_op_type_and_a_block():
    from diffquant.models.loading import load_denoiser
    from diffquant.passes.qua2sedimo.report import group
    from diffquant.passes.qua2sedimo.sensitivity import block_of, layer_importance, op_type

    sd, dit = (list(weight_layers(load_denoiser(f"builtin:{m}").model)) for m in ("digits-sd", "digits-dit"))
    assert "other" not in {op_type(n) for n in sd + dit}
    assert (
        op_type("time_embedding.linear_1")
        == op_type("transformer_blocks.0.norm1.emb.timestep_embedder.linear_2")
        == "time embedding"
    )
    assert op_type("proj_out_2") == op_type("conv_out") == "final projection"
    assert op_type("down_blocks.1.attentions.0.proj_out") == "transformer proj in/out"
    assert (
        op_type("transformer_blocks.0.norm1.linear") == "adaLN"
        and op_type("pos_embed.proj") == op_type("conv_in") == "patchify"
    )
    assert op_type("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "cross-attention"
    assert op_type("down_blocks.0.resnets.0.conv1") == "conv (ResBlock)"
    assert block_of("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "up_blocks.1"
    assert (
        block_of("transformer_blocks.3.ff.net.2") == "transformer_blocks.3"
        and block_of("conv_in") == "stem"
        and block_of("proj_out_1") == "head"
    )
    imp = layer_importance(
        {"a.to_q": {"x": 0.0, "y": -2.0}, "b.to_k": {"x": -1.0, "y": -1.5}, "conv_out": {"x": 0.0, "y": -5.0}}
    )
    agg = group([{"op_type": op_type(n), "importance": v} for n, v in imp.items()], "op_type")
    assert list(agg) == ["final projection", "attention Q/K/V"] and agg["attention Q/K/V"] == {
        "sum": 2.5,
        "mean": 1.25,
        "layers": 2.0,
    }
