"""The budgeted searches: every answer meets the budget; the greedy knapsack beats every random
configuration that meets it on the predicted score, the penalized top-1 (a Lagrangian: its
lambda jumps, so it can leave budget unused) at least the typical one."""

import random

import pytest

from diffquant.passes.qua2sedimo.budget import Costs, greedy_knapsack, penalized_top1


def _problem(seed: int = 0):
    rng = random.Random(seed)
    layers = [f"l{i}" for i in range(20)]
    numel = {n: rng.choice([512, 4096, 16384]) for n in layers}
    opts = ["uaq-w3", "uaq-w4", "kmeans-a-w3", "kmeans-a-w4"]
    per_weight = {"uaq-w3": 3.2, "uaq-w4": 4.2, "kmeans-a-w3": 3.01, "kmeans-a-w4": 4.01}
    bits = {n: {o: per_weight[o] * numel[n] for o in opts} for n in layers}
    sens = {n: rng.uniform(0.1, 3.0) for n in layers}
    effects = {n: {o: -sens[n] * (4.5 - per_weight[o]) * (1.3 if "kmeans" in o else 1.0) for o in opts} for n in layers}
    return effects, Costs(numel, bits)


def _score(effects, config):
    return sum(effects[n][o] for n, o in config.items())


@pytest.mark.parametrize("budget", [3.3, 3.6, 3.9])
def test_searches_meet_the_budget_and_beat_random_assignments(budget):
    effects, costs = _problem()
    rng = random.Random(1)
    feasible = []
    for _ in range(2000):
        c = {n: rng.choice(list(e)) for n, e in effects.items()}
        if costs.avg_bits(c) <= budget:
            feasible.append(_score(effects, c))
    feasible.sort()
    for search, floor in ((greedy_knapsack, feasible[-1]), (penalized_top1, feasible[len(feasible) // 2])):
        config = search(effects, costs, budget)
        assert config is not None and costs.avg_bits(config) <= budget + 1e-9, search.__name__
        assert _score(effects, config) >= floor, search.__name__


def test_an_impossible_budget_is_none_and_a_loose_one_is_the_unconstrained_best():
    effects, costs = _problem()
    assert penalized_top1(effects, costs, 2.0) is None and greedy_knapsack(effects, costs, 2.0) is None
    best = {n: max(e, key=e.get) for n, e in effects.items()}
    assert penalized_top1(effects, costs, 8.0) == best == greedy_knapsack(effects, costs, 8.0)
