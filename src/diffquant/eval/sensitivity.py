"""Qua2SeDiMo's explainable report: how sensitive every weight layer, operation type and block is,
how well the predictors rank configurations, what the budgeted searches chose, and the paper's
findings checked on this model. `analyze` measures it (`diffquant sensitivity`); a `qua2sedimo`
run builds the same report from its plan (`report_from_plan`); `write_report` writes
``sensitivity.md``, ``sensitivity.json`` and the PNG plots.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffquant._io import write_json, write_text
from diffquant.calib_data import CalibSet
from diffquant.models.denoiser import Denoiser
from diffquant.pipeline.budget import Costs, greedy_knapsack, penalized_top1
from diffquant.pipeline.predictor import ndcg_at_k, spearman
from diffquant.pipeline.qua2sedimo import marginal_effects, score_configs
from diffquant.pipeline.sensitivity import aggregate, block_of, layer_importance, op_type, sample_configs, score_config, weight_layers
from diffquant.quant.weight_options import METHODS, OptionCache, WeightOption

__all__ = ["Finding", "SensitivityConfig", "SensitivityReport", "analyze", "check_findings", "report_from_plan", "write_report"]


@dataclass
class SensitivityConfig:
    """M configurations (``holdout`` of them test the predictors), the options, the budgets searched."""

    configs: int = 200
    holdout: int = 50
    bits: list[int] = field(default_factory=lambda: [3, 4])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    per_step: int = 4
    predictors: list[str] = field(default_factory=lambda: ["ridge", "gnn"])
    budgets: list[float] = field(default_factory=lambda: [3.5, 3.7, 3.9])
    seed: int = 0

    @property
    def options(self) -> list[WeightOption]:
        return [WeightOption(m, b) for m in self.methods for b in self.bits]


@dataclass
class Finding:
    """One of the paper's claims, checked: ``held`` is None where the model cannot test it."""

    claim: str
    held: bool | None
    evidence: str


@dataclass
class SensitivityReport:
    """Everything `write_report` renders (and ``sensitivity.json`` holds)."""

    model: str
    layers: list[dict]  # name, op_type, block, weights, importance, effects {option: predicted effect}
    predictors: dict[str, dict]  # kind -> spearman, ndcg10, seconds, held_out [(predicted, measured)]
    searches: list[dict]  # budget, search, bits, measured_snr_db, used
    assignment: dict[str, str]
    findings: list[Finding] = field(default_factory=list)
    configs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _fit_all(denoiser: Denoiser, layers: list[str], cfg: SensitivityConfig, cache: OptionCache, configs: list, scores: list[float]) -> tuple[dict, object]:
    """Each predictor's held-out fit; the best one (by Spearman) refitted on every configuration."""
    from diffquant.pipeline.gnn import fit_predictor

    n_train, out = cfg.configs - cfg.holdout, {}
    true = torch.tensor(scores[n_train:])
    for kind in cfg.predictors:
        t0 = time.time()
        pred = fit_predictor(kind, denoiser, layers, cfg.options, cache, configs[:n_train], scores[:n_train], cfg.seed)
        got = pred.predict(configs[n_train:])
        out[kind] = {"spearman": spearman(got, true), "ndcg10": ndcg_at_k(got, true, 10), "seconds": round(time.time() - t0, 1),
                     "held_out": [(float(a), float(b)) for a, b in zip(got, true)]}
    best = max(out, key=lambda k: out[k]["spearman"])
    return out, fit_predictor(best, denoiser, layers, cfg.options, cache, configs, scores, cfg.seed)


def _searches(denoiser: Denoiser, calib: CalibSet, effects: dict, cache: OptionCache, cfg: SensitivityConfig) -> tuple[list[dict], dict[str, str]]:
    """Both searches at every budget, each measured; the assignment at the middle budget (the better one)."""
    mods = weight_layers(denoiser.model)
    opts = {o.label: o for o in cfg.options}
    costs = Costs({n: mods[n].weight.numel() for n in effects}, {n: {o.label: cache.get(mods[n].weight, o).avg_bits() * mods[n].weight.numel() for o in cfg.options} for n in effects})
    rows, chosen = [], {}
    for budget in cfg.budgets:
        found = {"penalized top-1": penalized_top1(effects, costs, budget), "greedy knapsack": greedy_knapsack(effects, costs, budget)}
        measured = {k: score_config(denoiser, {n: opts[o] for n, o in c.items()}, cache, calib, cfg.per_step).snr_db for k, c in found.items() if c is not None}
        for k, c in found.items():
            rows.append({"budget": budget, "search": k, "bits": None if c is None else round(costs.avg_bits(c), 3), "measured_snr_db": measured.get(k),
                         "used": bool(measured) and k == max(measured, key=measured.get)})
        if measured and budget == cfg.budgets[len(cfg.budgets) // 2]:
            chosen = found[max(measured, key=measured.get)]
    return rows, chosen


def analyze(denoiser: Denoiser, calib: CalibSet, cfg: SensitivityConfig, progress: bool = True) -> SensitivityReport:
    """Score ``cfg.configs`` random configurations against FP, fit and test the predictors, read the
    importance off the best one, search every budget, and check the paper's findings."""
    t0 = time.time()
    mods = weight_layers(denoiser.model)
    layers, cache = list(mods), OptionCache(None)
    configs = sample_configs(layers, cfg.configs, cfg.seed, tuple(cfg.bits), tuple(cfg.methods))
    scores = score_configs(denoiser, calib, configs, cache, cfg.per_step, progress)
    predictors, best = _fit_all(denoiser, layers, cfg, cache, configs, scores)
    effects = marginal_effects(best, layers, cfg.options)
    importance = layer_importance(effects)
    searches, chosen = _searches(denoiser, calib, effects, cache, cfg)
    rows = [{"name": n, "op_type": op_type(n), "block": block_of(n), "weights": mods[n].weight.numel(), "importance": importance[n], "effects": effects[n]}
            for n in layers]
    rep = SensitivityReport(denoiser.name, rows, predictors, searches, chosen, configs=cfg.configs, seconds=round(time.time() - t0, 1))
    rep.notes.append(f"score: noise-prediction SNR vs FP (dB) on {cfg.per_step} recorded inputs at each of {len(calib.timesteps)} calibration timesteps, "
                     f"weights only (activations FP); importance from the {max(predictors, key=lambda k: predictors[k]['spearman'])} predictor")
    rep.findings = check_findings(rep)
    return rep


def report_from_plan(plan) -> SensitivityReport | None:
    """The report of a `qua2sedimo` run, from what the pass left in its plan (None: a baseline
    search that measured no sensitivity)."""
    q = plan.recipe.get("qua2sedimo", {})
    if "importance" not in q:
        return None
    sizes = {lp.name: lp.weight_numel for lp in plan.layers.values()}
    rows = [{"name": n, "op_type": op_type(n), "block": block_of(n), "weights": sizes.get(n, 0), "importance": v, "effects": q["effects"][n]}
            for n, v in q["importance"].items()]
    predictors = {q.get("predictor", "ridge"): {"spearman": q["spearman"], "ndcg10": q["ndcg10"], "seconds": q["search_s"], "held_out": q["held_out"]}}
    searches = [{"budget": q["budget"], "search": k, "bits": None, "measured_snr_db": v, "used": k == q["used"]} for k, v in q["searches"].items()]
    rep = SensitivityReport(plan.model, rows, predictors, searches, q["assignment"], configs=q["configs"], seconds=q["search_s"])
    rep.findings = check_findings(rep)
    return rep


ATTENTION = ("attention Q/K/V", "attention out", "cross-attention", "transformer proj in/out")
SELF_ATTENTION = ("attention Q/K/V", "attention out")


def _mean(rows: list[dict], types: tuple[str, ...]) -> float | None:
    vals = [r["importance"] for r in rows if r["op_type"] in types]
    return sum(vals) / len(vals) if vals else None


def _preferred(rows: list[dict]) -> tuple[float, int] | None:
    """Share of weights (and layer count) whose best predicted option at equal bits is UAQ rather than a k-means."""
    uaq = total = 0.0
    n = 0
    for r in rows:
        for bits in {int(k.rsplit("-w", 1)[1]) for k in r["effects"]}:
            u, km = r["effects"].get(f"uaq-w{bits}"), [v for k, v in r["effects"].items() if k.startswith("kmeans") and k.endswith(f"-w{bits}")]
            if u is None or not km:
                return None
            uaq += r["weights"] * (u >= max(km))
            total += r["weights"]
            n += u >= max(km)
    return (uaq / total if total else 0.0), n


def check_findings(rep: SensitivityReport) -> list[Finding]:
    """The paper's four findings on this model (METHODS.md, Qua2SeDiMo), each held / not held / not testable."""
    rows = rep.layers
    types = aggregate({r["name"]: r["importance"] for r in rows}, op_type)
    ranked = sorted(types, key=lambda t: -types[t]["mean"])
    out = []
    have = [t for t in ("time embedding", "final projection") if t in types]
    ranks = ", ".join(f"{t} #{ranked.index(t) + 1} of {len(ranked)} ({types[t]['mean']:.3g})" for t in have)
    out.append(Finding("time embedding and final projection are the most sensitive (mean importance per layer)",
                       None if len(have) < 2 else all(ranked.index(t) < 2 for t in have), f"{ranks}; top: {', '.join(ranked[:3])}"))
    unet = any(r["op_type"] == "conv (ResBlock)" for r in rows)
    res, att, selfatt = _mean(rows, ("conv (ResBlock)",)), _mean(rows, ATTENTION), _mean(rows, SELF_ATTENTION)
    overall = sum(r["importance"] for r in rows) / max(1, len(rows))
    out.append(Finding("U-Nets: ResBlocks more sensitive than attention", (res > att) if unet and res is not None and att is not None else None,
                       f"ResBlock convs {res:.3g} vs attention {att:.3g} per layer" if unet and res is not None and att is not None else "no U-Net ResBlocks here"))
    out.append(Finding("DiTs: self-attention matters (above the mean layer)", (selfatt > overall) if not unet and selfatt is not None else None,
                       f"self-attention {selfatt:.3g} vs all layers {overall:.3g} per layer" if not unet and selfatt is not None else "not a DiT"))
    pref = _preferred(rows)
    if pref is None:
        out.append(Finding("U-Nets prefer uniform quantizers, DiTs k-means", None, "needs both UAQ and k-means options in the search"))
    else:
        share, n = pref
        out.append(Finding(f"{'U-Nets prefer uniform quantizers' if unet else 'DiTs prefer k-means'} (best predicted option at equal bits)",
                           share > 0.5 if unet else share < 0.5, f"UAQ best for {share:.0%} of the weights ({n} layer-bit pairs)"))
    return out


def _plots(rep: SensitivityReport, out: Path) -> list[tuple[str, str]]:
    """The PNGs: (file name, caption)."""
    from diffquant._plot import bar_chart, scatter, strip

    rows = rep.layers
    kinds = list(dict.fromkeys(r["op_type"] for r in rows))
    bar_chart([r["name"] for r in rows], [r["importance"] for r in rows], out / "sensitivity_layers.png", f"{rep.model}: importance per layer (dB of noise SNR)",
              colors=[kinds.index(r["op_type"]) for r in rows])
    agg = {k: aggregate({r["name"]: r["importance"] for r in rows}, key) for k, key in (("op", op_type), ("block", block_of))}
    bar_chart(list(agg["op"]), [v["mean"] for v in agg["op"].values()], out / "sensitivity_op_types.png", f"{rep.model}: mean importance per layer, by operation type")
    bar_chart(list(agg["block"]), [v["sum"] for v in agg["block"].values()], out / "sensitivity_blocks.png", f"{rep.model}: summed importance per block")
    scatter({f"{k} (Spearman {v['spearman']:.2f})": v["held_out"] for k, v in rep.predictors.items()}, out / "sensitivity_predictor.png",
            f"{rep.model}: held-out configurations", "predicted SNR (dB)", "measured SNR (dB)")
    labels = sorted(set(rep.assignment.values()))
    order = [r["name"] for r in rows if r["name"] in rep.assignment]
    marks = [(i, block_of(n)) for i, n in enumerate(order) if i == 0 or block_of(order[i - 1]) != block_of(n)]
    strip([labels.index(rep.assignment[n]) for n in order], labels, out / "sensitivity_assignment.png", f"{rep.model}: chosen option per layer, in network order",
          marks=marks[:: max(1, len(marks) // 12)])
    return [("sensitivity_layers.png", "importance per layer"), ("sensitivity_op_types.png", "per operation type"), ("sensitivity_blocks.png", "per block"),
            ("sensitivity_predictor.png", "predicted vs measured on held-out configurations"), ("sensitivity_assignment.png", "the chosen assignment")]


def _table(header: list[str], rows: list[list]) -> list[str]:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows] + [""]


def write_report(rep: SensitivityReport, out: str | Path) -> Path:
    """``sensitivity.md`` + ``sensitivity.json`` + PNG plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(rep, out)
    imp = {r["name"]: r["importance"] for r in rep.layers}
    md = [f"# Sensitivity of {rep.model} (Qua2SeDiMo)", "", f"{rep.configs} random weight configurations scored; {rep.seconds:.1f} s on this machine.", ""]
    md += [f"- {n}" for n in rep.notes] + ["", "## The paper's findings, checked", ""]
    md += [f"- **{'held' if f.held else 'not held' if f.held is not None else 'not testable'}**: {f.claim}. {f.evidence}" for f in rep.findings] + [""]
    md += ["## Predictors (held-out configurations)", ""] + _table(["predictor", "Spearman", "NDCG@10", "fit s"],
                                                                    [[k, v["spearman"], v["ndcg10"], v["seconds"]] for k, v in rep.predictors.items()])
    md += ["## Budgeted searches", ""] + _table(["budget", "search", "avg bits", "measured SNR dB", "used"],
                                                [[s["budget"], s["search"], s["bits"], s["measured_snr_db"], "yes" if s["used"] else ""] for s in rep.searches])
    for title, key in (("operation type", op_type), ("block", block_of)):
        agg = aggregate(imp, key)
        md += [f"## Importance per {title}", ""] + _table([title, "sum", "mean per layer", "layers"], [[k, v["sum"], v["mean"], int(v["layers"])] for k, v in agg.items()])
    md += ["## Per layer (and the chosen assignment)", ""] + _table(
        ["layer", "op type", "block", "weights", "importance", "chosen"],
        [[r["name"], r["op_type"], r["block"], r["weights"], r["importance"], rep.assignment.get(r["name"], "-")] for r in rep.layers])
    md += ["## Plots", ""] + [f"![{c}]({p})" for p, c in plots] + [""]
    write_text(out / "sensitivity.md", "\n".join(md))
    write_json(out / "sensitivity.json", rep.to_dict())
    return out / "sensitivity.md"
