"""Qua2SeDiMo's budgeted search: the best weight configuration whose average bits (scales, zero
points and codebooks in FP16 counted) stay within a budget, from per-layer option effects on the
score (a predictor's `layer_effects`) and per-layer option costs. Two searches, both reported:
(a) the paper's top-1 per unit with a bits penalty (lambda bisected to meet the budget) and
(b) a greedy knapsack that, while over budget, takes the step down with the least predicted
loss per bit saved, then spends what is left on the best gains per bit that still fit."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Costs", "greedy_knapsack", "penalized_top1"]


@dataclass
class Costs:
    """Per layer: its weight count, and each option's total bits (overhead included)."""

    numel: dict[str, int]
    bits: dict[str, dict[str, float]]

    def avg_bits(self, config: dict[str, str]) -> float:
        return sum(self.bits[n][o] for n, o in config.items()) / sum(self.numel[n] for n in config)


def penalized_top1(
    effects: dict[str, dict[str, float]], costs: Costs, budget: float, iters: int = 60
) -> dict[str, str] | None:
    """Per layer argmax(effect - lambda * bits per weight); the smallest lambda (bisected) whose
    configuration meets ``budget``; None if even the cheapest options exceed it."""

    def pick(lam: float) -> dict[str, str]:
        return {n: max(e, key=lambda o: e[o] - lam * costs.bits[n][o] / costs.numel[n]) for n, e in effects.items()}

    cheapest = {n: min(e, key=lambda o: costs.bits[n][o]) for n, e in effects.items()}
    if costs.avg_bits(cheapest) > budget:
        return None
    if costs.avg_bits(pick(0.0)) <= budget:
        return pick(0.0)
    lo, hi = 0.0, 1.0
    while costs.avg_bits(pick(hi)) > budget and hi < 1e12:
        hi *= 2.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if costs.avg_bits(pick(mid)) <= budget else (mid, hi)
    return pick(hi)


def greedy_knapsack(effects: dict[str, dict[str, float]], costs: Costs, budget: float) -> dict[str, str] | None:
    """Start from each layer's best option; while over ``budget``, switch the one layer whose
    move to a cheaper option loses the least predicted score per bit saved. None if infeasible."""
    config = {n: max(e, key=e.get) for n, e in effects.items()}
    while costs.avg_bits(config) > budget:
        best = None
        for n, e in effects.items():
            cur = config[n]
            for o in e:
                saved = costs.bits[n][cur] - costs.bits[n][o]
                if saved > 0:
                    ratio = (e[cur] - e[o]) / saved
                    if best is None or ratio < best[0]:
                        best = (ratio, n, o)
        if best is None:
            return None
        config[best[1]] = best[2]
    return _refill(effects, costs, budget, config)


def _refill(
    effects: dict[str, dict[str, float]], costs: Costs, budget: float, config: dict[str, str]
) -> dict[str, str]:
    """Spend what the last step down left: while some layer's move to a better option still fits
    ``budget``, take the one with the most predicted gain per bit added."""
    while True:
        best = None
        for n, e in effects.items():
            cur = config[n]
            for o in e:
                added, gain = costs.bits[n][o] - costs.bits[n][cur], e[o] - e[cur]
                if gain > 0 and costs.avg_bits({**config, n: o}) <= budget:
                    ratio = gain / max(added, 1e-9)
                    if best is None or ratio > best[0]:
                        best = (ratio, n, o)
        if best is None:
            return config
        config[best[1]] = best[2]
