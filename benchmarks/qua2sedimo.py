"""Qua2SeDiMo's budget study on both builtin models, deployed graph (N = 1000) with the torch
fake-quant beside it: uniform UAQ W4A8 / W3A8, the `qua2sedimo` recipe at budgets 3.5 / 3.7 / 3.9
average weight bits (overhead counted), the paper's bit set [3, 4] at 3.7, random assignments and
largest-layers-first at the same budgets, and the research option set (all six options, k-means
centroids deployed on an INT8 per-channel grid: the research numerics within half an 8-bit
step). Same activation calibration (A8, static MSE) in every row.

    python benchmarks/qua2sedimo.py                   # N = 1000, both models
    python benchmarks/qua2sedimo.py --samples 100 --models digits-dit

Rows go into benchmarks/results/quality.json (kept rows are skipped, so a stopped run continues);
the table is benchmarks/results/qua2sedimo.md.
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

RESEARCH = {"methods": ["uaq", "kmeans-c", "kmeans-a"], "bits": [3, 4], "kmeans_lowering": "codebook", "score": "noise"}
NOISE = {"score": "noise"}  # rows measured before the recipe scored configurations by their samples
ROWS: list[tuple[str, str, dict]] = [
    ("uaq uniform W4", "w4a8", {"search": "uniform", "uniform": 4}),
    ("uaq uniform W3", "w3a8", {"search": "uniform", "uniform": 3}),
    *[(f"qua2sedimo B={b}", "w4a8", {"budget": b}) for b in (3.5, 3.7, 3.9)],
    ("qua2sedimo B=3.7 (noise-SNR scores)", "w4a8", {"budget": 3.7, **NOISE}),
    ("qua2sedimo bits [3, 4] B=3.7", "w4a8", {"budget": 3.7, "bits": [3, 4], **NOISE}),
    ("qua2sedimo B=3.7 (GNN predictor)", "w4a8", {"budget": 3.7, "predictor": "gnn", **NOISE}),
    *[(f"random B={b}", "w4a8", {"budget": b, "search": "random", "bits": [3, 4]}) for b in (3.5, 3.7, 3.9)],
    ("largest-first B=3.7", "w4a8", {"budget": 3.7, "search": "largest-first", "bits": [3, 4]}),
    ("qua2sedimo research (6 options) B=3.7", "w4a8", {"budget": 3.7, **RESEARCH}),
]

# run order: what the done-when compares first, so a stopped run has those rows
FIRST = ("uaq uniform W4", "qua2sedimo B=3.7", "uaq uniform W3", "largest-first B=3.7", "random B=3.7")


def _fmt(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], path: Path) -> None:
    """One table per model: deployed and fake-quant quality, bits, predictor fit, search time."""
    lines = [
        "# Qua2SeDiMo budget study",
        "",
        "Written by `python benchmarks/qua2sedimo.py`. Deployed: the onnxruntime Q/DQ graph (N as listed);",
        "fake-quant: the torch model of the same plan. FD to FP / PSNR / SSIM are against the FP samples of the "
        "same seeds.",
        "Bits: average weight bits with FP16 scales, zero points and codebooks counted (the paper's accounting), "
        "over every",
        "conv / linear; `deployed bits` differ from `research bits` only where a k-means layer is lowered "
        "(centroids in 8 bits).",
        "Configurations are scored by the PSNR of 20 samples against FP from the calibration seeds (the recipe's "
        "default),",
        "except the noise-SNR-scores, bits [3, 4], GNN and research rows, which were scored by noise SNR.",
        "Noise SNR column: the chosen assignment's noise prediction vs FP on calibration inputs (weights only). "
        "Spearman /",
        "NDCG@10: the predictor on held-out configurations (M scored in all), of whichever score the row used. "
        "`search s`:",
        "sampling, scoring, fitting and searching; rows ran 2-3 at a time on the 2 cores, one thread each.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {(r["recipe"], r["graph"]): r for r in rows if r["model"] == model}
        lines += [
            f"## {model}",
            "",
            "| row | research bits | deployed bits | FD to FP | PSNR | SSIM | accuracy | fake-quant FD to FP | "
            "fake-quant PSNR "
            "| noise SNR dB | Spearman | NDCG@10 | M | search s | parity steps |",
            "|" + "---|" * 15,
        ]
        for label, _, _ in ROWS:
            d, f = by.get((label, "deployed")), by.get((label, "fake_quant"))
            if d is None:
                continue
            q = d.get("qua2sedimo", {})
            lines.append(
                f"| {label} | {_fmt(q.get('research_bits'), 3)} | {_fmt(q.get('deployed_bits'), 3)} | "
                f"{_fmt(d.get('fd_fp'))} | {_fmt(d['psnr'], 2)} "
                f"| {_fmt(d['ssim'], 4)} | {_fmt(d['accuracy'], 3)} | {_fmt(f and f.get('fd_fp'))} | "
                f"{_fmt(f and f['psnr'], 2)} "
                f"| {_fmt(q.get('noise_snr_db'), 2)} | {_fmt(q.get('spearman'), 3)} | {_fmt(q.get('ndcg10'), 3)} | "
                f"{q.get('configs', '-')} "
                f"| {_fmt(q.get('search_s'))} | {_fmt(d.get('parity_max_step_error'), 2)} |"
            )
        lines.append("")
    write_text_atomic(path, "\n".join(lines))


def main() -> int:
    ap = common_args(__doc__, "row labels")
    ap.add_argument("--force", action="store_true", help="recompute rows that exist already")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    out, grids, jpath, rows = open_results(a.out)
    seeds = parse_seeds(a)
    if len(seeds) > 1:  # one process per calibration seed
        return run_seeds(a, seeds, __file__)
    only = set(filter(None, a.only.split(",")))
    torch.manual_seed(0)
    for model in a.models.split(","):
        b = Bench(model, a.samples, a.fq_samples, progress=not a.quiet, calib_seed=seeds[0])
        b.first_seed = int(a.first_seed)
        rows = add_fp_row(b, rows, grids, jpath)
        have = {key_of(r) for r in rows if current(r)}
        for label, bits, ov in sorted(ROWS, key=lambda r: FIRST.index(r[0]) if r[0] in FIRST else len(FIRST)):
            if (only and label not in only) or (
                (model, label, bits, "deployed", a.samples, b.calib_seed) in have and not a.force
            ):
                continue
            new = run_recipe(b, "qua2sedimo", bits, grids, {"qua2sedimo": ov}, label)
            rows = save_rows(jpath, new)
            d = new[0]
            print(
                f"{model:10s} {label:40s} bits {d['qua2sedimo']['deployed_bits']:.3f} FD-FP {d.get('fd_fp', 0):7.1f} "
                f"PSNR {d['psnr']:6.2f}",
                flush=True,
            )
            write_all_markdown(rows, out)
            write_table(
                [
                    r
                    for r in table_rows(rows, b.first_seed)
                    if r["recipe"] in {x[0] for x in ROWS} and r["n_samples"] in (a.samples, a.fq_samples)
                ],
                out / "qua2sedimo.md",
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
