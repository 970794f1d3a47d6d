"""Qua2SeDiMo's explainable report: how sensitive every weight layer, operation type and block is,
how well the predictors rank configurations, what the budgeted searches chose, and the paper's
findings checked on the model. The numbers come from `diffquant.passes.qua2sedimo.analyze` (the
`diffquant sensitivity` command, or a `qua2sedimo` run's plan); this module checks the findings
and writes ``sensitivity.md``, ``sensitivity.json`` and the PNG plots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffquant._io import write_json, write_text
from diffquant.passes.qua2sedimo.sensitivity import block_of, op_type

__all__ = [
    "Finding",
    "SensitivityReport",
    "check_findings",
    "group",
    "read_report",
    "report_from_plan",
    "write_plan_report",
    "write_report",
]


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
    searches: list[dict]  # budget, search, bits, measured_db (the score), used
    assignment: dict[str, str]
    findings: list[Finding] = field(default_factory=list)
    configs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    score: str = "noise SNR"  # what the configurations were scored by (dB): noise SNR or sample PSNR

    def to_dict(self) -> dict:
        return asdict(self)


def group(rows: list[dict], key: str) -> dict[str, dict[str, float]]:
    """Importance summed and averaged per ``rows[i][key]`` (``op_type`` or ``block``), largest sum first."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r["importance"])
    out = {g: {"sum": sum(v), "mean": sum(v) / len(v), "layers": float(len(v))} for g, v in groups.items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["sum"]))


ATTENTION = ("attention Q/K/V", "attention out", "cross-attention", "transformer proj in/out")
SELF_ATTENTION = ("attention Q/K/V", "attention out")


def _mean(rows: list[dict], types: tuple[str, ...]) -> float | None:
    vals = [r["importance"] for r in rows if r["op_type"] in types]
    return sum(vals) / len(vals) if vals else None


def _preferred(rows: list[dict]) -> tuple[float, int, int] | None:
    """Share of weights (and layer count) whose best predicted option at equal bits is UAQ rather than a k-means."""
    uaq = total = 0.0
    n = pairs = 0
    for r in rows:
        for bits in {int(k.rsplit("-w", 1)[1]) for k in r["effects"]}:
            u, km = (
                r["effects"].get(f"uaq-w{bits}"),
                [v for k, v in r["effects"].items() if k.startswith("kmeans") and k.endswith(f"-w{bits}")],
            )
            if u is None or not km:
                return None
            uaq += r["weights"] * (u >= max(km))
            total += r["weights"]
            n += u >= max(km)
            pairs += 1
    return (uaq / total if total else 0.0), n, pairs


def check_findings(rep: SensitivityReport) -> list[Finding]:
    """The paper's four findings on this model (METHODS.md, Qua2SeDiMo), each held / not held / not testable."""
    rows = rep.layers
    types = group(rows, "op_type")
    ranked = sorted(types, key=lambda t: -types[t]["mean"])
    out = []
    have = [t for t in ("time embedding", "final projection") if t in types]
    ranks = ", ".join(f"{t} #{ranked.index(t) + 1} of {len(ranked)} ({types[t]['mean']:.3g})" for t in have)
    out.append(
        Finding(
            "time embedding and final projection are the most sensitive (mean importance per layer)",
            None if len(have) < 2 else all(ranked.index(t) < 2 for t in have),
            f"{ranks}; top: {', '.join(ranked[:3])}",
        )
    )
    unet = any(r["op_type"] == "conv (ResBlock)" for r in rows)
    res, att, selfatt = _mean(rows, ("conv (ResBlock)",)), _mean(rows, ATTENTION), _mean(rows, SELF_ATTENTION)
    overall = sum(r["importance"] for r in rows) / max(1, len(rows))
    out.append(
        Finding(
            "U-Nets: ResBlocks more sensitive than attention",
            (res > att) if unet and res is not None and att is not None else None,
            f"ResBlock convs {res:.3g} vs attention {att:.3g} per layer"
            if unet and res is not None and att is not None
            else "no U-Net ResBlocks here",
        )
    )
    out.append(
        Finding(
            "DiTs: self-attention matters (above the mean layer)",
            (selfatt > overall) if not unet and selfatt is not None else None,
            f"self-attention {selfatt:.3g} vs all layers {overall:.3g} per layer"
            if not unet and selfatt is not None
            else "not a DiT",
        )
    )
    pref = _preferred(rows)
    if pref is None:
        out.append(
            Finding(
                "U-Nets prefer uniform quantizers, DiTs k-means",
                None,
                "needs both UAQ and k-means options in the search",
            )
        )
    else:
        share, n, pairs = pref
        out.append(
            Finding(
                f"{'U-Nets prefer uniform quantizers' if unet else 'DiTs prefer k-means'} (best predicted option at "
                "equal bits)",
                share > 0.5 if unet else share < 0.5,
                f"UAQ best for {share:.0%} of the weights ({n} of {pairs} layer-bit pairs)",
            )
        )
    return out


def _plots(rep: SensitivityReport, out: Path) -> list[tuple[str, str]]:
    """The PNGs: (file name, caption)."""
    from diffquant._plot import bar_chart, scatter, strip

    rows = rep.layers
    kinds = list(dict.fromkeys(r["op_type"] for r in rows))
    bar_chart(
        [r["name"] for r in rows],
        [r["importance"] for r in rows],
        out / "sensitivity_layers.png",
        f"{rep.model}: importance per layer (dB of {rep.score})",
        colors=[kinds.index(r["op_type"]) for r in rows],
    )
    agg = {k: group(rows, key) for k, key in (("op", "op_type"), ("block", "block"))}
    bar_chart(
        list(agg["op"]),
        [v["mean"] for v in agg["op"].values()],
        out / "sensitivity_op_types.png",
        f"{rep.model}: mean importance per layer, by operation type",
    )
    bar_chart(
        list(agg["block"]),
        [v["sum"] for v in agg["block"].values()],
        out / "sensitivity_blocks.png",
        f"{rep.model}: summed importance per block",
    )
    scatter(
        {f"{k} (Spearman {v['spearman']:.2f})": v["held_out"] for k, v in rep.predictors.items()},
        out / "sensitivity_predictor.png",
        f"{rep.model}: held-out configurations",
        f"predicted {rep.score} (dB)",
        f"measured {rep.score} (dB)",
    )
    labels = sorted(set(rep.assignment.values()))
    order = [r["name"] for r in rows if r["name"] in rep.assignment]
    block = {r["name"]: r["block"] for r in rows}
    marks = [(i, block[n]) for i, n in enumerate(order) if i == 0 or block[order[i - 1]] != block[n]]
    strip(
        [labels.index(rep.assignment[n]) for n in order],
        labels,
        out / "sensitivity_assignment.png",
        f"{rep.model}: chosen option per layer, in network order",
        marks=marks,
    )
    return [
        ("sensitivity_layers.png", "importance per layer"),
        ("sensitivity_op_types.png", "per operation type"),
        ("sensitivity_blocks.png", "per block"),
        ("sensitivity_predictor.png", "predicted vs measured on held-out configurations"),
        ("sensitivity_assignment.png", "the chosen assignment"),
    ]


def _table(header: list[str], rows: list[list]) -> list[str]:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
    return (
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
        + [""]
    )


def write_report(rep: SensitivityReport, out: str | Path) -> list[Path]:
    """``sensitivity.md`` + ``sensitivity.json`` + PNG plots into ``out``; the files written,
    ``sensitivity.md`` first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(rep, out)
    md = [
        f"# Sensitivity of {rep.model} (Qua2SeDiMo)",
        "",
        f"{rep.configs} random weight configurations scored; {rep.seconds:.1f} s on this machine.",
        "",
    ]
    md += [f"- {n}" for n in rep.notes] + ["", "## The paper's findings, checked", ""]
    md += [
        f"- **{'held' if f.held else 'not held' if f.held is not None else 'not testable'}**: {f.claim}. {f.evidence}"
        for f in rep.findings
    ] + [""]
    md += ["## Predictors (held-out configurations)", ""] + _table(
        ["predictor", "Spearman", "NDCG@10", "fit s"],
        [[k, v["spearman"], v["ndcg10"], v["seconds"]] for k, v in rep.predictors.items()],
    )
    md += ["## Budgeted searches", ""] + _table(
        ["budget", "search", "avg bits", f"measured {rep.score} dB", "used"],
        [[s["budget"], s["search"], s["bits"], s["measured_db"], "yes" if s["used"] else ""] for s in rep.searches],
    )
    for title, key in (("operation type", "op_type"), ("block", "block")):
        agg = group(rep.layers, key)
        md += [f"## Importance per {title}", ""] + _table(
            [title, "sum", "mean per layer", "layers"],
            [[k, v["sum"], v["mean"], int(v["layers"])] for k, v in agg.items()],
        )
    md += ["## Per layer (and the chosen assignment)", ""] + _table(
        ["layer", "op type", "block", "weights", "importance", "chosen"],
        [
            [r["name"], r["op_type"], r["block"], r["weights"], r["importance"], rep.assignment.get(r["name"], "-")]
            for r in rep.layers
        ],
    )
    md += ["## Plots", ""] + [f"![{c}]({p})" for p, c in plots] + [""]
    write_text(out / "sensitivity.md", "\n".join(md))
    write_json(out / "sensitivity.json", rep.to_dict())
    return [out / "sensitivity.md", out / "sensitivity.json", *(out / p for p, _ in plots)]


def read_report(path: str | Path) -> SensitivityReport:
    """A report back from its ``sensitivity.json`` (to render it again)."""
    from diffquant._check import read_json

    data = read_json(
        path,
        "write it again with `diffquant sensitivity`",
        required=("model", "layers", "predictors", "searches", "assignment"),
    )
    data["findings"] = [Finding(**f) for f in data.get("findings", [])]
    return SensitivityReport(**data)


def report_from_plan(plan) -> SensitivityReport | None:
    """The report of a `qua2sedimo` run, from what the pass left in its plan (None: a baseline
    search that measured no sensitivity)."""
    q = plan.recipe.get("qua2sedimo", {})
    if "importance" not in q:
        return None
    sizes = {lp.name: lp.weight_numel for lp in plan.layers.values()}
    rows = [
        {
            "name": n,
            "op_type": op_type(n),
            "block": block_of(n),
            "weights": sizes.get(n, 0),
            "importance": v,
            "effects": q["effects"][n],
        }
        for n, v in q["importance"].items()
    ]
    predictors = {
        q.get("predictor", "ridge"): {
            "spearman": q["spearman"],
            "ndcg10": q["ndcg10"],
            "seconds": q["search_s"],
            "held_out": q["held_out"],
        }
    }
    searches = [
        {"budget": q["budget"], "search": k, "bits": None, "measured_db": v, "used": k == q["used"]}
        for k, v in q["searches"].items()
    ]
    rep = SensitivityReport(
        plan.model,
        rows,
        predictors,
        searches,
        q["assignment"],
        configs=q["configs"],
        seconds=q["search_s"],
        score="sample PSNR" if q.get("score") == "samples" else "noise SNR",
    )
    rep.findings = check_findings(rep)
    return rep


def write_plan_report(plan, out: Path) -> list[Path]:
    """The `qua2sedimo` pass's report hook: a run's sensitivity report beside its report.md (none
    for a baseline search, which measured no sensitivity)."""
    rep = report_from_plan(plan)
    return [] if rep is None else write_report(rep, out)
