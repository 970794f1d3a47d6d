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

Lowering. UAQ codes c in [0, 2^b - 1] with an integer zero point z are written as symmetric codes
c - z with the same (FP16-rounded) scale: exact. The symmetric grid that holds them is b bits wide
only when z = 2^(b-1); otherwise b + 1 (``widened``; the INT8 container holds either). K-Means
codebooks have no Q/DQ form: ``kmeans_lowering: regrid`` re-quantizes such a layer with UAQ at the
same bits (the error change is reported), ``fp16`` keeps its weights in floating point, and
``codebook`` rounds the centroids onto an INT8 per-channel grid (each row still holds at most 2^b
values, within half an 8-bit step of the codebook: the research numerics on the deployed graph,
counted as b-bit indices plus 8-bit centroids and an FP16 scale per row).

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

import torch
from tqdm.auto import tqdm

from diffquant.calib_data import CalibSet
from diffquant.errors import DiffquantError
from diffquant.models.denoiser import Denoiser
from diffquant.pipeline.budget import Costs, greedy_knapsack, penalized_top1
from diffquant.pipeline.context import PassContext
from diffquant.pipeline.gnn import fit_predictor
from diffquant.pipeline.minmax import plan_weight
from diffquant.pipeline.predictor import RidgePredictor, ndcg_at_k, spearman
from diffquant.pipeline.registry import register_pass
from diffquant.pipeline.sensitivity import (
    SampleProbe,
    block_of,
    layer_importance,
    op_type,
    sample_configs,
    score_config,
)
from diffquant.quant.fake import round_scale
from diffquant.quant.format import PerAxis, QuantFormat
from diffquant.quant.plan import PassReport
from diffquant.quant.weight_options import METHODS, OptionCache, WeightOption, uaq

__all__ = [
    "Qua2SeDiMoConfig",
    "Sensitivity",
    "lower_codebook",
    "lower_uaq",
    "marginal_effects",
    "measure_sensitivity",
    "qua2sedimo_pass",
    "score_configs",
]

SEARCHES = ("best", "penalized", "greedy", "random", "largest-first", "uniform")
PREDICTORS = ("ridge", "gnn")
SCORES = ("noise", "samples")
LOWERINGS = ("regrid", "fp16", "codebook")


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
                f"bits must list two or more widths within 2..7, ascending (the paper: [3, 4]; a widened 7-bit UAQ row still fits INT8), got {self.bits}"
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


@dataclass
class Sensitivity:
    """What the sampled configurations taught: the scores, the fitted predictor's per-layer
    option effects and its held-out rank correlation, the wall time, and the sample probe
    (``score: samples``) the scores came from."""

    layers: list[str]
    configs: list[dict[str, WeightOption]]
    scores: list[float]
    effects: dict[str, dict[str, float]]
    spearman: float
    ndcg10: float
    seconds: float
    predictor: object = None
    held_out: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured)
    probe: SampleProbe | None = None

    def measure(
        self, denoiser: Denoiser, calib: CalibSet, config: dict[str, WeightOption], cache: OptionCache, per_step: int
    ) -> float:
        """One configuration's score, as the sampled ones were scored."""
        s = score_config(denoiser, config, cache, calib, per_step, probe=self.probe)
        return s.snr_db if self.probe is None else s.sample_psnr


def measure_sensitivity(
    denoiser: Denoiser,
    calib: CalibSet,
    layers: list[str],
    cfg: Qua2SeDiMoConfig,
    cache: OptionCache,
    progress: bool = True,
) -> Sensitivity:
    """Sample and score ``cfg.configs`` configurations, fit the predictor on all but the last
    ``holdout``, measure its rank correlation on those, then refit on all of them."""
    t0 = time.time()
    configs = sample_configs(layers, cfg.configs, cfg.seed, tuple(cfg.bits), tuple(cfg.methods))
    probe = SampleProbe.build(denoiser, calib, cfg.probe_samples) if cfg.score == "samples" else None
    scores = score_configs(denoiser, calib, configs, cache, cfg.per_step, progress, probe)
    n_train = cfg.configs - cfg.holdout
    rho = ndcg = float("nan")
    held: list[tuple[float, float]] = []
    if cfg.holdout:
        pred = fit_predictor(
            cfg.predictor, denoiser, layers, cfg.options, cache, configs[:n_train], scores[:n_train], cfg.seed
        )
        got, true = pred.predict(configs[n_train:]), torch.tensor(scores[n_train:])
        rho, ndcg = spearman(got, true), ndcg_at_k(got, true, 10)
        held = [(float(a), float(b)) for a, b in zip(got, true)]
    pred = fit_predictor(cfg.predictor, denoiser, layers, cfg.options, cache, configs, scores, cfg.seed)
    effects = marginal_effects(pred, layers, cfg.options)
    return Sensitivity(layers, configs, scores, effects, rho, ndcg, time.time() - t0, pred, held, probe)


def score_configs(
    denoiser: Denoiser,
    calib: CalibSet,
    configs: list[dict[str, WeightOption]],
    cache: OptionCache,
    per_step: int,
    progress: bool = True,
    probe: SampleProbe | None = None,
) -> list[float]:
    """Each configuration's noise SNR vs FP (dB) on ``per_step`` inputs per calibration timestep,
    or with a ``probe`` its sample PSNR (dB)."""
    with torch.no_grad():
        reference = {ts: denoiser(**calib.at(ts, per_step)) for ts in calib.timesteps}
    scored = [
        score_config(denoiser, c, cache, calib, per_step, reference, probe)
        for c in tqdm(configs, desc="scoring configurations", disable=not progress)
    ]
    return [s.snr_db if probe is None else s.sample_psnr for s in scored]


def marginal_effects(pred, layers: list[str], options: list[WeightOption]) -> dict[str, dict[str, float]]:
    """Per layer and option, the predicted score when only that layer changes from the base (every
    layer at its first option), minus the base's. Exact for ridge; the GNN's local view."""
    if isinstance(pred, RidgePredictor):
        return pred.layer_effects()
    base = {n: options[0] for n in layers}
    variants = [dict(base, **{n: o}) for n in layers for o in options]
    got = pred.predict([base] + variants)
    b, rest = float(got[0]), got[1:].reshape(len(layers), len(options))
    return {n: {o.label: float(rest[i, j]) - b for j, o in enumerate(options)} for i, n in enumerate(layers)}


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
    sens = measure_sensitivity(ctx.denoiser, ctx.calib, layers, cfg, cache, ctx.progress)
    how = (
        f"noise SNR vs FP, {cfg.per_step} inputs per calibration timestep"
        if cfg.score == "noise"
        else f"PSNR of {cfg.probe_samples} samples vs FP"
    )
    report.notes.append(
        f"predictor {cfg.predictor}: {cfg.configs} configurations scored ({how}), held-out {cfg.holdout}: Spearman {sens.spearman:.3f}, NDCG@10 {sens.ndcg10:.3f}; {sens.seconds:.1f} s"
    )
    found = {
        "penalized": penalized_top1(sens.effects, costs, cfg.budget),
        "greedy": greedy_knapsack(sens.effects, costs, cfg.budget),
    }
    if all(v is None for v in found.values()):
        cheapest = costs.avg_bits({n: min(costs.bits[n], key=costs.bits[n].get) for n in layers})
        raise DiffquantError(
            f"qua2sedimo.budget={cfg.budget}: no assignment fits (the cheapest options average {cheapest:.2f} bits); raise the budget"
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
            f"qua2sedimo.search={pick}: no assignment within budget {cfg.budget}; raise the budget or use search: greedy"
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


def lower_uaq(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], float]:
    """UAQ at ``bits`` as a symmetric per-channel grid: (weight on the grid, FP16-rounded scale,
    symmetric width per row (bits, or bits + 1 where the zero point is not 2^(bits-1)), the
    paper's bits per weight with FP16 scale and zero point)."""
    qw = uaq(weight, bits)
    scale = round_scale(qw.scale)
    rows = qw.codes.reshape(len(scale), -1).float() - qw.zero[:, None]
    widths = tuple(
        bits if (r.min() >= -(2 ** (bits - 1)) and r.max() <= 2 ** (bits - 1) - 1) else bits + 1 for r in rows
    )
    assert all(r.abs().max() <= 2**bits for r in rows), (
        "UAQ zero points lie on the grid, so b + 1 bits hold every shifted row"
    )
    w = (rows * scale[:, None]).reshape(weight.shape).to(weight.dtype)
    return w, scale, widths, qw.avg_bits()


def _lower(
    ctx: PassContext, name: str, w: torch.Tensor, opt: WeightOption, cache: OptionCache, cfg: Qua2SeDiMoConfig
) -> list:
    """Write ``name``'s chosen option into the plan; the report row (research and deployed form)."""
    lp = ctx.plan.layers[name]
    research = cache.get(w, opt)
    r_err, r_bits = research.error(w), research.avg_bits()
    row = [name, op_type(name), block_of(name), w.numel(), opt.label, round(r_bits, 3), round(r_err, 4)]
    if opt.research_only and cfg.kmeans_lowering == "fp16":
        del lp.sites["weight"]
        lp.notes.append(f"Qua2SeDiMo: {opt.label} has no Q/DQ form: weights kept in floating point")
        return row + ["fp16", 16.0, 0.0, "-"]
    if opt.research_only and cfg.kmeans_lowering == "codebook":
        new, scale, d_bits = lower_codebook(research)
        lp.weight_site.format, lp.weight_site.scale = QuantFormat(bits=8, granularity=PerAxis(0)), scale
        ctx.plan.weights[name] = new.to(w.dtype)
        d_err = float((new.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        lp.notes.append(f"Qua2SeDiMo: {opt.label}, deployed as its codebook values on an INT8 per-channel grid")
        return row + ["codebook on int8 grid", round(d_bits, 3), round(d_err, 4), "-"]
    new, scale, widths, d_bits = lower_uaq(w, opt.bits)
    lp.weight_site.format = QuantFormat(bits=widths if len(set(widths)) > 1 else widths[0], granularity=PerAxis(0))
    lp.weight_site.scale = scale
    ctx.plan.weights[name] = new
    d_err = float((new.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
    widened = sum(1 for b in widths if b > opt.bits)
    how = f"uaq-w{opt.bits}" + (" (re-gridded)" if opt.research_only else "")
    lp.notes.append(
        f"Qua2SeDiMo: {opt.label}, deployed {how}: {len(widths) - widened} rows exact at {opt.bits} bits, {widened} widened to {opt.bits + 1}"
    )
    return row + [how, round(d_bits, 3), round(d_err, 4), f"{len(widths) - widened} / {widened}"]


@register_pass("qua2sedimo", Qua2SeDiMoConfig)
def qua2sedimo_pass(ctx: PassContext, cfg: Qua2SeDiMoConfig) -> None:
    """Search every weight layer's option for the budget and lower it into the plan's weight sites."""
    plan = ctx.plan
    layers = [lp.name for lp in plan.quantized_layers() if lp.weight_site is not None]
    if plan.weights.keys() & set(layers):
        raise DiffquantError(
            "qua2sedimo must run before passes that replace weights (it scores the model's own weights); move it up in the recipe"
        )
    weights = {n: plan_weight(ctx, n).float() for n in layers}
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
        report.rows.append(_lower(ctx, n, weights[n], chosen[n], cache, cfg))
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


def lower_codebook(qw) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A K-Means option's values on a symmetric INT8 per-channel grid: (weight, FP16-rounded
    scale, bits per weight counting b-bit indices, 8-bit centroids and the FP16 scales)."""
    w = qw.dequantize().float()
    rows = w.reshape(w.shape[0], -1)
    scale = round_scale(rows.abs().amax(dim=1) / 127)
    new = (torch.clamp(torch.round(rows / scale[:, None]), -127, 127) * scale[:, None]).reshape(w.shape)
    n = w.numel()
    return new, scale, (qw.option.bits * n + 8 * qw.centroids.numel() + 16 * len(scale)) / n
