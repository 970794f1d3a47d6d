"""Qua2SeDiMo's weight options: UAQ, K-Means-C, K-Means-A at 3 / 4 bits, data-free and cached."""

import torch
from torch import nn

from diffquant.passes.qua2sedimo.options import CLIP_RATIOS, METHODS, OptionCache, WeightOption, quantize_option, uaq


def _laplace(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=g) - 0.5
    return -0.05 * torch.sign(u) * torch.log1p(-2 * u.abs())  # heavy-tailed, like trained weights


def test_uaq_is_a_per_channel_asymmetric_grid_with_the_best_clip_ratio():
    w = _laplace(16, 64) + torch.linspace(-0.1, 0.1, 16)[:, None]  # rows off-centre: asymmetric grids pay
    for bits in (3, 4):
        q = uaq(w, bits)
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
        deq = q.dequantize()
        assert torch.allclose(deq, (q.codes.float() - q.zero[:, None]) * q.scale[:, None])
        # the chosen ratio is no worse, row by row in L2.4, than plain min-max (ratio 1.0)
        levels = 2**bits - 1
        lo, hi = w.min(dim=1).values, w.max(dim=1).values
        s = (hi - lo) / levels
        z = torch.round(-lo / s)
        plain = (torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, levels) - z[:, None]) * s[:, None]
        assert ((deq - w).abs().pow(2.4).sum(1) <= (plain - w).abs().pow(2.4).sum(1) + 1e-9).all()
    assert len(CLIP_RATIOS) == 10 and uaq(w, 4).error(w) < uaq(w, 3).error(w)


def test_kmeans_codebooks_per_channel_and_per_layer():
    w = _laplace(8, 128, seed=1)
    for bits in (3, 4):
        c = quantize_option(w, WeightOption("kmeans-c", bits))
        a = quantize_option(w, WeightOption("kmeans-a", bits))
        assert c.centroids.shape == (8, 2**bits) and a.centroids.shape == (1, 2**bits)
        assert all(len(torch.unique(row)) <= 2**bits for row in c.dequantize())
        assert len(torch.unique(a.dequantize())) <= 2**bits
        # a codebook per channel fits heavy tails better than one per layer and than a uniform grid
        assert c.error(w) < a.error(w) and c.error(w) < uaq(w, bits).error(w)


def test_bits_are_counted_with_the_fp16_overhead():
    w = _laplace(64, 32)
    assert quantize_option(w, WeightOption("uaq", 4)).avg_bits() == (4 * 2048 + 16 * 2 * 64) / 2048
    assert quantize_option(w, WeightOption("kmeans-c", 3)).avg_bits() == (3 * 2048 + 16 * 8 * 64) / 2048
    assert quantize_option(w, WeightOption("kmeans-a", 3)).avg_bits() == (3 * 2048 + 16 * 8) / 2048
    assert WeightOption("kmeans-a", 3).research_only and not WeightOption("uaq", 3).research_only


def test_every_conv_and_linear_of_a_real_denoiser_gets_six_options_once(tiny_unet, tmp_path):
    cache = OptionCache(tmp_path / "opts")
    layers = {n: m for n, m in tiny_unet.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    options = [WeightOption(m, b) for m in METHODS for b in (3, 4)]
    for name, m in list(layers.items())[:6]:
        for opt in options:
            q = cache.get(m.weight, opt)
            assert q.dequantize().shape == m.weight.shape, (name, opt)
            assert cache.get(m.weight, opt) is q  # computed once
    assert len(list((tmp_path / "opts").glob("*.safetensors"))) == 6 * len(options)
    # a fresh cache on the same folder serves the same codes without recomputing; another weight misses
    first = next(iter(layers.values())).weight
    again = OptionCache(tmp_path / "opts").get(first, options[2])
    assert torch.equal(again.codes, cache.get(first, options[2]).codes)
    assert OptionCache.digest(first) != OptionCache.digest(first + 1e-3)
