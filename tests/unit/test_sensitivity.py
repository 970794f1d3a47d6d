"""Qua2SeDiMo's random configurations and their fidelity scores on a real (tiny) denoiser."""

import torch

from diffquant.pipeline.sensitivity import apply_config, config_bits, sample_configs, score_config, weight_layers
from diffquant.quant.weight_options import METHODS, OptionCache, WeightOption
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
