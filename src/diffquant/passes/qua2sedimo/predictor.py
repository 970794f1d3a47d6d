"""Predicting a weight configuration's score from the configuration: the simple baseline (ridge
regression over per-layer one-hot option features) and the rank metrics both predictors are
judged by on held-out configurations (Spearman, NDCG@k)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.passes.qua2sedimo.options import WeightOption

__all__ = ["RidgePredictor", "ndcg_at_k", "one_hot", "spearman"]


def one_hot(config: dict[str, WeightOption], layers: list[str], options: list[WeightOption]) -> torch.Tensor:
    """[len(layers) * len(options)]: a 1 at each layer's chosen option."""
    index = {o: i for i, o in enumerate(options)}
    x = torch.zeros(len(layers), len(options), dtype=torch.float64)
    for li, name in enumerate(layers):
        x[li, index[config[name]]] = 1.0
    return x.reshape(-1)


@dataclass
class RidgePredictor:
    """score ~ b + sum over layers of w[layer, option]; ``alpha`` the L2 penalty."""

    layers: list[str]
    options: list[WeightOption]
    alpha: float = 1.0
    weights: torch.Tensor | None = None
    bias: float = 0.0

    def features(self, configs: list[dict[str, WeightOption]]) -> torch.Tensor:
        return torch.stack([one_hot(c, self.layers, self.options) for c in configs])

    def fit(self, configs: list[dict[str, WeightOption]], scores: list[float]) -> RidgePredictor:
        x, y = self.features(configs), torch.tensor(scores, dtype=torch.float64)
        xm, ym = x.mean(dim=0), y.mean()
        xc = x - xm
        a = xc.T @ xc + self.alpha * torch.eye(x.shape[1], dtype=torch.float64)
        self.weights = torch.linalg.solve(a, xc.T @ (y - ym))
        self.bias = float(ym - xm @ self.weights)
        return self

    def predict(self, configs: list[dict[str, WeightOption]]) -> torch.Tensor:
        if self.weights is None:
            raise ValueError("fit the predictor first")
        return self.features(configs) @ self.weights + self.bias

    def layer_effects(self) -> dict[str, dict[str, float]]:
        """Per layer, each option's fitted effect on the score (its importance, read off the model)."""
        w = self.weights.reshape(len(self.layers), len(self.options))
        return {n: {o.label: float(w[i, j]) for j, o in enumerate(self.options)} for i, n in enumerate(self.layers)}


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their mean rank."""
    v = v.double()
    order = torch.argsort(v)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    for value in torch.unique(v):
        tie = v == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors."""
    a, b = _ranks(torch.as_tensor(pred)), _ranks(torch.as_tensor(true))
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def ndcg_at_k(pred: torch.Tensor, true: torch.Tensor, k: int = 10) -> float:
    """NDCG@k of the ranking by ``pred``, with graded relevance = ``true`` shifted to start at 0
    (higher score = more relevant): 1 when the top k are ordered as the truth orders them."""
    pred, true = torch.as_tensor(pred).double(), torch.as_tensor(true).double()
    rel = true - true.min()
    k = min(k, len(true))
    disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    got = (rel[torch.argsort(pred, descending=True)[:k]] * disc).sum()
    best = (rel.sort(descending=True).values[:k] * disc).sum()
    return float(got / best) if best > 0 else 1.0
