"""The analysis behind `diffquant sensitivity` (the `jobs.sensitivity` job): score random weight
configurations, fit and compare the predictors, read each layer's importance off the best, search
the budgets, and hand the numbers to `report` to be checked against the paper's findings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from diffquant.calib_data import CalibSet
from diffquant.models.denoiser import Denoiser
from diffquant.passes.qua2sedimo.budget import Costs, greedy_knapsack, penalized_top1
from diffquant.passes.qua2sedimo.gnn import Space, fit_predictor
from diffquant.passes.qua2sedimo.options import METHODS, OptionCache, WeightOption
from diffquant.passes.qua2sedimo.predictor import ndcg_at_k, spearman
from diffquant.passes.qua2sedimo.report import SensitivityReport, check_findings
from diffquant.passes.qua2sedimo.search import marginal_effects, score_configs
from diffquant.passes.qua2sedimo.sensitivity import (
    SampleProbe,
    block_of,
    layer_importance,
    op_type,
    sample_configs,
    score_config,
    weight_layers,
)

__all__ = ["SensitivityConfig", "analyze"]


@dataclass
class SensitivityConfig:
    """M configurations (``holdout`` of them test the predictors), the options, the budgets searched,
    and the score: ``noise`` (noise SNR on recorded inputs) or ``samples`` (PSNR of
    ``probe_samples`` samples from the calibration seeds against FP)."""

    configs: int = 200
    holdout: int = 50
    bits: list[int] = field(default_factory=lambda: [3, 4])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    per_step: int = 4
    predictors: list[str] = field(default_factory=lambda: ["ridge", "gnn"])
    budgets: list[float] = field(default_factory=lambda: [3.5, 3.7, 3.9])
    seed: int = 0
    score: str = "noise"
    probe_samples: int = 20

    @property
    def options(self) -> list[WeightOption]:
        return [WeightOption(m, b) for m in self.methods for b in self.bits]


def _fit_all(
    denoiser: Denoiser,
    layers: list[str],
    cfg: SensitivityConfig,
    cache: OptionCache,
    configs: list,
    scores: list[float],
) -> tuple[dict, object]:
    """Each predictor's held-out fit; the best one (by Spearman) refitted on every configuration."""
    n_train, out, space = cfg.configs - cfg.holdout, {}, Space(denoiser, layers, cfg.options, cache)
    true = torch.tensor(scores[n_train:])
    for kind in cfg.predictors:
        t0 = time.time()
        pred = fit_predictor(kind, space, configs[:n_train], scores[:n_train], seed=cfg.seed)
        got = pred.predict(configs[n_train:])
        out[kind] = {
            "spearman": spearman(got, true),
            "ndcg10": ndcg_at_k(got, true, 10),
            "seconds": round(time.time() - t0, 1),
            "held_out": [(float(a), float(b)) for a, b in zip(got, true)],
        }
    best = max(out, key=lambda k: out[k]["spearman"])
    return out, fit_predictor(best, space, configs, scores, seed=cfg.seed)


def _searches(
    denoiser: Denoiser,
    calib: CalibSet,
    effects: dict,
    cache: OptionCache,
    cfg: SensitivityConfig,
    probe: SampleProbe | None,
) -> tuple[list[dict], dict[str, str]]:
    """Both searches at every budget, each measured; the assignment at the middle budget (the better one)."""
    mods = weight_layers(denoiser.model)
    opts = {o.label: o for o in cfg.options}
    costs = Costs(
        {n: mods[n].weight.numel() for n in effects},
        {
            n: {o.label: cache.get(mods[n].weight, o).avg_bits() * mods[n].weight.numel() for o in cfg.options}
            for n in effects
        },
    )
    rows, chosen = [], {}
    for budget in cfg.budgets:
        found = {
            "penalized top-1": penalized_top1(effects, costs, budget),
            "greedy knapsack": greedy_knapsack(effects, costs, budget),
        }
        scored = {
            k: score_config(denoiser, {n: opts[o] for n, o in c.items()}, cache, calib, cfg.per_step, probe=probe)
            for k, c in found.items()
            if c is not None
        }
        measured = {k: s.snr_db if probe is None else s.sample_psnr for k, s in scored.items()}
        for k, c in found.items():
            rows.append(
                {
                    "budget": budget,
                    "search": k,
                    "bits": None if c is None else round(costs.avg_bits(c), 3),
                    "measured_db": measured.get(k),
                    "used": bool(measured) and k == max(measured, key=measured.get),
                }
            )
        if measured and budget == cfg.budgets[len(cfg.budgets) // 2]:
            chosen = found[max(measured, key=measured.get)]
    return rows, chosen


def analyze(denoiser: Denoiser, calib: CalibSet, cfg: SensitivityConfig, *, progress: bool = True) -> SensitivityReport:
    """Score ``cfg.configs`` random configurations against FP, fit and test the predictors, read the
    importance off the best one, search every budget, and check the paper's findings."""
    t0 = time.time()
    mods = weight_layers(denoiser.model)
    layers, cache = list(mods), OptionCache(None)
    configs = sample_configs(layers, cfg.configs, cfg.seed, tuple(cfg.bits), tuple(cfg.methods))
    probe = SampleProbe.build(denoiser, calib, cfg.probe_samples) if cfg.score == "samples" else None
    scores = score_configs(denoiser, calib, configs, cache, cfg.per_step, progress=progress, probe=probe)
    predictors, best = _fit_all(denoiser, layers, cfg, cache, configs, scores)
    effects = marginal_effects(best, layers, cfg.options)
    importance = layer_importance(effects)
    searches, chosen = _searches(denoiser, calib, effects, cache, cfg, probe)
    rows = [
        {
            "name": n,
            "op_type": op_type(n),
            "block": block_of(n),
            "weights": mods[n].weight.numel(),
            "importance": importance[n],
            "effects": effects[n],
        }
        for n in layers
    ]
    rep = SensitivityReport(
        denoiser.name,
        rows,
        predictors,
        searches,
        chosen,
        configs=cfg.configs,
        seconds=round(time.time() - t0, 1),
        score="noise SNR" if probe is None else "sample PSNR",
    )
    how = (
        f"noise-prediction SNR vs FP (dB) on {cfg.per_step} recorded inputs at each of {len(calib.timesteps)} "
        "calibration timesteps"
        if probe is None
        else f"PSNR (dB) of {cfg.probe_samples} samples against the FP samples of the same seeds "
        f"({calib.config.steps} steps)"
    )
    rep.notes.append(
        f"score: {how}, "
        "weights only (activations FP); importance from the "
        f"{max(predictors, key=lambda k: predictors[k]['spearman'])} predictor"
    )
    rep.findings = check_findings(rep)
    return rep
