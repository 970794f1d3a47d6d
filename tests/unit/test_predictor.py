"""The ridge baseline predictor and the rank metrics it is judged by."""

import random

import torch

from diffquant.passes.qua2sedimo.options import METHODS, WeightOption
from diffquant.passes.qua2sedimo.predictor import RidgePredictor, ndcg_at_k, spearman
from diffquant.passes.qua2sedimo.sensitivity import sample_configs


def test_rank_metrics():
    t = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.7])
    assert abs(spearman(t, t) - 1.0) < 1e-12 and abs(spearman(-t, t) + 1.0) < 1e-12
    assert ndcg_at_k(t, t, k=3) == 1.0 and ndcg_at_k(-t, t, k=3) < 0.5
    assert (
        abs(spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) - 0.8660254) < 1e-6
    )  # ties share a rank


def test_ridge_recovers_a_layerwise_score_on_held_out_configurations():
    layers = [f"layer{i}" for i in range(12)]
    options = [WeightOption(m, b) for m in METHODS for b in (3, 4)]
    rng = random.Random(0)
    # a hidden truth: each (layer, option) costs some dB; layer 0 (the "time embedding") costs most at 3 bits
    cost = {
        (n, o): rng.uniform(0, 1) * (4 - o.bits + 0.2) * (5.0 if n == "layer0" else 1.0)
        for n in layers
        for o in options
    }
    configs = sample_configs(layers, 160, seed=1)
    g = torch.Generator().manual_seed(0)
    scores = [30.0 - sum(cost[(n, c[n])] for n in layers) + 0.05 * float(torch.randn(1, generator=g)) for c in configs]
    ridge = RidgePredictor(layers, options, alpha=0.1).fit(configs[:120], scores[:120])
    pred = ridge.predict(configs[120:])
    true = torch.tensor(scores[120:])
    assert spearman(pred, true) > 0.95 and ndcg_at_k(pred, true, k=10) > 0.9
    effects = ridge.layer_effects()
    spread = {n: max(e.values()) - min(e.values()) for n, e in effects.items()}
    assert max(spread, key=spread.get) == "layer0"  # the most sensitive layer is read off the fit
