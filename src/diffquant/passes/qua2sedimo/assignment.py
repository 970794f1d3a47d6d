"""The `qua2sedimo` pass: Qua2SeDiMo's weight assignment for a bit budget, written into the plan.

Steps (METHODS.md, Qua2SeDiMo): (1) every weight layer's options (method x bits) are computed
data-free; (2) ``configs`` random configurations are scored against FP, activations FP (the
search is over weights): ``score: noise`` is the noise-prediction SNR on recorded calibration
inputs, ``score: samples`` the PSNR of ``probe_samples`` whole samples against FP from the
calibration set's seeds (error accumulated along the trajectory; one sampling run per
configuration); (3) a predictor (ridge
over one-hot options, or the GATv2 graph network) is fitted, its rank correlation measured on the
last ``holdout`` configurations; (4) per-layer marginal effects feed the budgeted searches (the
paper's penalized top-1 and a greedy knapsack; ``search: best`` scores both for real and keeps
the better); (5) the assignment is lowered to deployable per-channel grids.

Lowering (`lowering`): each option as a deployable per-channel grid.

Bits are counted as the paper does: code bits plus FP16 scale, zero point or codebook. Deployed,
a UAQ row costs the same (2^b levels, scale, shift); the report also gives the symmetric grid width.
Baselines for the benchmark: ``search: uniform`` (every layer UAQ at ``uniform`` bits),
``random`` and ``largest-first`` (layers moved to the low bit width at random, or largest first,
until the budget is met).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from diffquant.errors import DiffquantError
from diffquant.passes.context import PassContext
from diffquant.passes.qua2sedimo.budget import Costs, greedy_knapsack, penalized_top1
from diffquant.passes.qua2sedimo.lowering import LOWERINGS, lower_option
from diffquant.passes.qua2sedimo.options import METHODS, OptionCache, WeightOption
from diffquant.passes.qua2sedimo.report import write_plan_report
from diffquant.passes.qua2sedimo.search import measure_sensitivity
from diffquant.passes.qua2sedimo.sensitivity import layer_importance, score_config
from diffquant.passes.registry import register_pass
from diffquant.quant.plan import PassReport

__all__ = ["Qua2SeDiMoConfig", "qua2sedimo_pass"]

SEARCHES = ("best", "penalized", "greedy", "random", "largest-first", "uniform")
PREDICTORS = ("ridge", "gnn")
SCORES = ("noise", "samples")


@dataclass
class Qua2SeDiMoConfig:
    """Budget (average weight bits, FP16 overhead counted), the options searched, how many random
    configurations train the predictor (``holdout`` of them only test it) and which search decides.
    ``methods`` defaults to UAQ alone: the options that deploy exactly; add ``kmeans-c`` /
    ``kmeans-a`` for the research set (lowered by ``kmeans_lowering``)."""

    version: int = 1
    budget: float = 3.7
    bits: list[int] = field(default_factory=lambda: [3, 4])
    methods: list[str] = field(default_factory=lambda: ["uaq"])
    configs: int = 200
    holdout: int = 50
    per_step: int = 4
    predictor: str = "ridge"
    score: str = "noise"
    probe_samples: int = 20
    search: str = "best"
    kmeans_lowering: str = "regrid"
    uniform: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (("search", SEARCHES), ("predictor", PREDICTORS), ("score", SCORES), ("kmeans_lowering", LOWERINGS))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.methods or set(self.methods) - set(METHODS):
            raise ValueError(f"methods must be a non-empty list of {METHODS}, got {self.methods}")
        if len(self.bits) < 2 or sorted(set(self.bits)) != self.bits or not (2 <= self.bits[0] and self.bits[-1] <= 7):
            raise ValueError(
                "bits must list two or more widths within 2..7, ascending (the paper: [3, 4]; a widened 7-bit UAQ "
                f"row still fits INT8), got {self.bits}"
            )
        if not 2 <= self.uniform <= 7:
            raise ValueError(f"uniform (the width of search: uniform) must be 2..7, got {self.uniform}")
        if self.configs < 10 or not 0 <= self.holdout < self.configs or self.per_step < 1 or self.probe_samples < 1:
            raise ValueError(
                f"need configs >= 10, 0 <= holdout < configs, per_step >= 1, probe_samples >= 1; "
                f"got {self.configs}, {self.holdout}, {self.per_step}, {self.probe_samples}"
            )
        if not 2.0 <= self.budget <= 16.0:
            raise ValueError(f"budget is average weight bits, 2..16; got {self.budget}")

    @property
    def options(self) -> list[WeightOption]:
        return [WeightOption(m, b) for m in self.methods for b in self.bits]


def _fallback(layers: list[str], costs: Costs, cfg: Qua2SeDiMoConfig, order: list[str]) -> dict[str, str]:
    """All layers at the high bit width, then layers in ``order`` moved to the low one until the budget holds."""
    hi, lo = WeightOption(cfg.methods[0], cfg.bits[-1]).label, WeightOption(cfg.methods[0], cfg.bits[0]).label
    config = {n: hi for n in layers}
    for n in order:
        if costs.avg_bits(config) <= cfg.budget:
            break
        config[n] = lo
    return config


def _search(
    ctx: PassContext,
    layers: list[str],
    weights: dict,
    cache: OptionCache,
    costs: Costs,
    cfg: Qua2SeDiMoConfig,
    report: PassReport,
) -> dict[str, str]:
    """The assignment (layer -> option label) the configured search picks."""
    if cfg.search == "uniform":
        return {n: f"uaq-w{cfg.uniform}" for n in layers}
    if cfg.search in ("random", "largest-first"):
        order = list(layers)
        random.Random(cfg.seed).shuffle(order) if cfg.search == "random" else order.sort(
            key=lambda n: -weights[n].numel()
        )
        return _fallback(layers, costs, cfg, order)
    sens = measure_sensitivity(ctx.denoiser, ctx.calib, layers, cfg, cache, progress=ctx.progress)
    how = (
        f"noise SNR vs FP, {cfg.per_step} inputs per calibration timestep"
        if cfg.score == "noise"
        else f"PSNR of {cfg.probe_samples} samples vs FP"
    )
    report.notes.append(
        f"predictor {cfg.predictor}: {cfg.configs} configurations scored ({how}), held-out {cfg.holdout}: Spearman "
        f"{sens.spearman:.3f}, NDCG@10 {sens.ndcg10:.3f}; {sens.seconds:.1f} s"
    )
    found = {
        "penalized": penalized_top1(sens.effects, costs, cfg.budget),
        "greedy": greedy_knapsack(sens.effects, costs, cfg.budget),
    }
    if all(v is None for v in found.values()):
        cheapest = costs.avg_bits({n: min(costs.bits[n], key=costs.bits[n].get) for n in layers})
        raise DiffquantError(
            f"qua2sedimo.budget={cfg.budget}: no assignment fits (the cheapest options average {cheapest:.2f} bits); "
            "raise the budget"
        )
    measured = {}
    opts = {o.label: o for o in cfg.options}
    for name, conf in found.items():
        if conf is not None:
            measured[name] = sens.measure(
                ctx.denoiser, ctx.calib, {n: opts[o] for n, o in conf.items()}, cache, cfg.per_step
            )
            report.notes.append(
                f"search {name}: {costs.avg_bits(conf):.3f} bits, measured {cfg.score} score {measured[name]:.2f} dB"
            )
    pick = max(measured, key=measured.get) if cfg.search == "best" else cfg.search
    if found.get(pick) is None:
        raise DiffquantError(
            f"qua2sedimo.search={pick}: no assignment within budget {cfg.budget}; raise the budget or use search: "
            "greedy"
        )
    report.notes.append(f"used: {pick}")
    ctx.plan.recipe.setdefault("qua2sedimo", {}).update(
        spearman=sens.spearman,
        ndcg10=sens.ndcg10,
        configs=cfg.configs,
        search_s=round(sens.seconds, 1),
        held_out=sens.held_out,
        importance=layer_importance(sens.effects),
        effects=sens.effects,
        searches=dict(measured),
        used=pick,
        predictor=cfg.predictor,
        score=cfg.score,
    )
    return found[pick]


@register_pass("qua2sedimo", Qua2SeDiMoConfig, report=write_plan_report)
def qua2sedimo_pass(ctx: PassContext, cfg: Qua2SeDiMoConfig) -> None:
    """Search every weight layer's option for the budget and lower it into the plan's weight sites."""
    plan = ctx.plan
    layers = [lp.name for lp in plan.quantized_layers() if lp.weight_site is not None]
    if plan.weights.keys() & set(layers):
        raise DiffquantError(
            "qua2sedimo must run before passes that replace weights (it scores the model's own weights); move it up "
            "in the recipe"
        )
    weights = {n: ctx.weight(n).float() for n in layers}
    cache = OptionCache(None)
    costs = Costs({n: w.numel() for n, w in weights.items()}, {})
    for n, w in tqdm(weights.items(), desc="qua2sedimo options", disable=not ctx.progress or cfg.search == "uniform"):
        costs.bits[n] = (
            {o.label: cache.get(w, o).avg_bits() * w.numel() for o in cfg.options} if cfg.search != "uniform" else {}
        )
    report = PassReport(
        "qua2sedimo",
        f"Qua2SeDiMo weight assignment (search {cfg.search}, budget {cfg.budget} bits)",
        [
            "layer",
            "op type",
            "block",
            "weights",
            "research",
            "research bits",
            "research error",
            "deployed",
            "deployed bits",
            "deployed error",
            "rows exact / widened",
        ],
    )
    plan.reports.append(report)
    t0 = time.time()
    assignment = _search(ctx, layers, weights, cache, costs, cfg, report)
    opts = {o.label: o for o in cfg.options + [WeightOption("uaq", cfg.uniform)]}
    chosen = {n: opts[o] for n, o in assignment.items()}
    snr = score_config(ctx.denoiser, chosen, cache, ctx.calib, cfg.per_step).snr_db
    for n in layers:
        report.rows.append(lower_option(ctx, n, weights[n], chosen[n], cache, cfg.kmeans_lowering))
    numel = sum(w.numel() for w in weights.values())
    research = sum(r[5] * r[3] for r in report.rows) / numel
    deployed = sum(r[8] * r[3] for r in report.rows) / numel
    summary = {
        "research_bits": round(research, 4),
        "deployed_bits": round(deployed, 4),
        "budget": cfg.budget,
        "search": cfg.search,
        "noise_snr_db": round(snr, 3),
        "assignment": assignment,
        "wall_s": round(time.time() - t0, 1),
    }
    plan.recipe.setdefault("qua2sedimo", {}).update(summary)
    report.notes.append(f"the assignment's noise SNR vs FP (research weights, FP activations): {snr:.2f} dB")
    report.notes.append(
        f"average weight bits (FP16 overhead counted): research {research:.3f}, deployed {deployed:.3f}; "
        f"the symmetric grids (widened rows at b + 1) average {plan.bits.weight_bits:.3f} bits before scales"
    )
