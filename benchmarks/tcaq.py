"""TCAQ-DM on both builtin models, deployed graph (N = 1000) with the research form beside it
(the torch fake-quant of the same plan, N = 250: DAQ's attention-probability quantizers act only
there): `tcaq` at W8A8, W6A6, W4A8, W4A6 and W4A4 beside `qdiffusion` and `dmq` at the same bits,
and the ablation at W4A6 (``--ablation-bits``), one component changed at a time from the full
recipe: TCR off / LES instead of TCR, TCR's cap R, DAQ off (every attention probability on the
uniform grid, the quantizer DAQ improves on) and no P quantizers at all, PAR rounds 0 / 1 / 3.

    python benchmarks/tcaq.py                                  # everything (hours on 2 cores)
    python benchmarks/tcaq.py --models digits-dit --only "tcaq,qdiffusion" --bits w4a6
    # an effect at the paper's bits:
    python benchmarks/tcaq.py --models digits-dit --only "tcaq: TCR off" --ablation-bits w6a6

Rows go into benchmarks/results/quality.json (kept rows are skipped, so a stopped run continues;
the qdiffusion / dmq rows are the quality table's own); the table is benchmarks/results/tcaq.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import (
    Bench,
    add_fp_row,
    common_args,
    open_results,
    parse_seeds,
    run_recipe,
    run_seeds,
    write_all_markdown,
    write_text_atomic,
)  # noqa: E402
from rows import current, key_of, save_rows, table_rows  # noqa: E402

from diffquant.passes import load_recipe  # noqa: E402
from diffquant.passes.recipes import Recipe  # noqa: E402

BITS = ("w8a8", "w6a6", "w4a8", "w4a6", "w4a4")
RECIPES = ("tcaq", "qdiffusion", "dmq")
# (label, what changes from the full tcaq recipe); the full recipe is TCR R = 10, PAR 2 rounds, DAQ on
ABLATION: list[tuple[str, dict]] = [
    ("tcaq: TCR off", {"tcr": {"r_max": 1.0}}),
    ("tcaq: LES instead of TCR", {"replace_tcr_by_les": True}),
    *[(f"tcaq: TCR R = {r:g}", {"tcr": {"r_max": r}}) for r in (2.0, 5.0, 100.0)],
    ("tcaq: DAQ off (every P uniform)", {"daq": {"mode": "uniform"}}),
    ("tcaq: no P quantizers", {"daq": {"enabled": False}}),
    *[(f"tcaq: PAR {k} round{'s' if k != 1 else ''}", {"reconstruct": {"par_rounds": k}}) for k in (0, 1, 3)],
]


def les_instead_of_tcr() -> Recipe:
    """The tcaq recipe with its TCR pass replaced by DMQ's LES pass (same settings as `dmq`)."""
    recipe = load_recipe("tcaq")
    les = next(cfg for name, cfg in load_recipe("dmq").passes if name == "les")
    recipe.passes = [("les", les) if name == "tcr" else (name, cfg) for name, cfg in recipe.passes]
    return recipe


def _fmt(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], path: Path, ablation_bits: str) -> None:
    """Main table (recipe x bits) and the ablation tables (``ablation_bits`` first, then any other
    bits that have ablation rows: the paper states each effect at its own bits), per model."""
    lines = [
        "# TCAQ-DM",
        "",
        "Written by `python benchmarks/tcaq.py`. Deployed: the onnxruntime Q/DQ graph; research: the torch fake-quant",
        "of the same plan (DAQ's attention-probability quantizers act only there). FD to FP / PSNR against the FP "
        "samples",
        "of the same seeds. `quantize s`: the recipe's wall time on 2 cores (rows ran 2-4 at a time, one thread each).",
        "qdiffusion / dmq rows are the quality table's own.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {(r["recipe"], r["bits"], r["graph"]): r for r in rows if r["model"] == model}
        head = "| deployed FD to FP | deployed PSNR | research FD to FP | research PSNR | quantize s | parity steps |"
        lines += [f"## {model}", "", "| recipe | bits " + head, "|" + "---|" * 8]
        for bits in BITS:
            for recipe in RECIPES:
                lines += _line(by, recipe, bits, f"| {recipe} | {bits} ")
        for bits in [ablation_bits] + [b for b in BITS if b != ablation_bits]:
            found = [line for label, _ in ABLATION for line in _line(by, label, bits, f"| {label} ")]
            if found:
                lines += [
                    "",
                    f"### Ablation at {bits} (one change from the full `tcaq`)",
                    "",
                    "| row " + head,
                    "|" + "---|" * 7,
                ]
                lines += _line(by, "tcaq", bits, "| tcaq (full: TCR R = 10, PAR 2 rounds, DAQ adaptive) ") + found
        lines.append("")
    write_text_atomic(path, "\n".join(lines))


def _line(by: dict, recipe: str, bits: str, lead: str) -> list[str]:
    d, f = by.get((recipe, bits, "deployed")), by.get((recipe, bits, "fake_quant"))
    if d is None:
        return []
    return [
        f"{lead}| {_fmt(d.get('fd_fp'))} | {_fmt(d['psnr'], 2)} | {_fmt(f and f.get('fd_fp'))} | "
        f"{_fmt(f and f['psnr'], 2)} "
        f"| {_fmt(d.get('quantize_s'), 0)} | {_fmt(d.get('parity_max_step_error'), 2)} |"
    ]


def _jobs(a) -> list[tuple[str, str, object, dict]]:
    """(label, bits, recipe name or Recipe, overrides) in run order: the done-when pair first."""
    bits = [b for b in a.bits.split(",") if b]
    jobs = [(r, b, r, {}) for b in ["w4a6"] + [x for x in bits if x != "w4a6"] if b in bits for r in RECIPES]
    for label, ov in ABLATION:
        jobs.append(
            (
                label,
                a.ablation_bits,
                les_instead_of_tcr() if ov.get("replace_tcr_by_les") else "tcaq",
                {k: v for k, v in ov.items() if k != "replace_tcr_by_les"},
            )
        )
    only = set(filter(None, a.only.split(",")))
    return [j for j in jobs if not only or j[0] in only]


def main() -> int:
    ap = common_args(__doc__, "row labels (recipe names or ablation labels)")
    ap.add_argument("--bits", default=",".join(BITS), help="bit settings of the main table")
    ap.add_argument("--ablation-bits", default="w4a6", help="the bits the ablation rows run at")
    ap.add_argument("--force", action="store_true", help="recompute rows that exist already")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    out, grids, jpath, rows = open_results(a.out)
    seeds = parse_seeds(a)
    if len(seeds) > 1:  # one process per calibration seed
        return run_seeds(a, seeds, __file__)
    torch.manual_seed(0)
    for model in a.models.split(","):
        b = Bench(model, a.samples, a.fq_samples, progress=not a.quiet, calib_seed=seeds[0])
        b.first_seed = int(a.first_seed)
        rows = add_fp_row(b, rows, grids, jpath)
        have = {key_of(r) for r in rows if current(r)}
        for label, bits, recipe, ov in _jobs(a):
            if (model, label, bits, "deployed", a.samples, b.calib_seed) in have and not a.force:
                continue
            new = run_recipe(b, recipe, bits, grids, ov, label if label not in RECIPES else "")
            rows = save_rows(jpath, new)
            d, f = new
            print(
                f"{model:10s} {label:28s} {bits} FD-FP {d.get('fd_fp', 0):7.1f} PSNR {d['psnr']:6.2f} | research "
                f"FD-FP {f.get('fd_fp', 0):7.1f} "
                f"PSNR {f['psnr']:6.2f} | {d['quantize_s']:.0f} s",
                flush=True,
            )
            write_all_markdown(rows, out)
            picked = table_rows(rows, b.first_seed)
            write_table(
                [r for r in picked if r["n_samples"] in (a.samples, a.fq_samples)], out / "tcaq.md", a.ablation_bits
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
