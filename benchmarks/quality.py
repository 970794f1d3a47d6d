"""The digits quality table (the protocol of docs/ARCHITECTURE.md, "Measuring quality"): every
recipe x bit setting on both builtin models, measured on the deployed graph (the
``onnxruntime``-target Q/DQ graph run by ONNX Runtime with its fused integer kernels: what this CPU
machine deploys), with the torch fake-quant numbers beside them.

    python benchmarks/quality.py                       # N = 1000, both models, every row
    python benchmarks/quality.py --samples 100 --only minmax:w8a8,qdiffusion:w4a8
    python benchmarks/quality.py --models digits-ldm     # the latent text-to-image builtin (LDM_CONFIGS)

Rows: the recipes at W8A8 / W4A8 / W4A6, and minmax, qdiffusion, dmq, efficientdm and mpqdm at
MPQ-DM's low-bit settings (W2A4, W3A4, W4A4, W2A6); ablations of dmq (W4A8) and mpqdm (W2A4), one
component changed at a time. FD to the FP samples of the same seeds is the leading column.
digits-ldm gets every recipe at W8A8 and W4A8, calibrated on other phrasings than the prompts it is
evaluated with ("a handwritten seven"; see `calib_denoiser`).

Writes benchmarks/results/quality.json (a list of rows; rows already there for the same model,
recipe, bits, graph and N are kept and skipped, so a stopped run continues), quality.md,
<recipe>_ablation.md, and a sample grid per row under benchmarks/results/quality/. Where
``nvidia-modelopt`` is installed (``pip install .[peers]``) ModelOpt's own INT8 SmoothQuant
fake-quant runs on the same model and calibration data as a peer row (graph ``fake_quant``:
ModelOpt's simulation, not exported).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from diffquant._io import write_json
from diffquant.calib_data import CalibConfig, collect
from diffquant.calib_data.collect import pick_inputs
from diffquant.cli import parse_overrides
from diffquant.engines import GroupedEngine, OrtEngine
from diffquant.eval import check_parity, merge_parity, save_grid, score_samples
from diffquant.exporters import export
from diffquant.jobs.run import engine_eps_fn, torch_eps_fn
from diffquant.models.loading import LoadConfig, load_classifier, load_denoiser
from diffquant.models.sampler import SamplerConfig, prompt_batch, sample
from diffquant.passes import Recipe, load_recipe, quantize
from diffquant.passes.context import PassContext
from diffquant.passes.registry import get_pass
from diffquant.quant import QuantPlan, fake_quant_forms
from diffquant.zoo.data import load_digits_tensor

RESULTS = Path(__file__).parent / "results"
CONFIGS = [
    ("minmax", "w8a8"),
    ("minmax", "w4a8"),
    ("minmax", "w4a6"),
    ("modelopt-int8", "w8a8"),
    ("qdiffusion", "w8a8"),
    ("qdiffusion", "w4a8"),
    ("qdiffusion", "w4a6"),
    ("dmq", "w8a8"),
    ("dmq", "w4a8"),
    ("dmq", "w4a6"),
]
# the low-bit settings of MPQ-DM's tables, for every recipe
LOW_BITS = ("w2a4", "w3a4", "w4a4", "w2a6")
CONFIGS += [(r, b) for b in LOW_BITS for r in ("minmax", "qdiffusion", "dmq", "efficientdm", "mpqdm")]
# digits-ldm (the latent text-to-image builtin): every recipe at W8A8 and W4A8; qua2sedimo's weight
# bits come from its budget (3.7 average), so it has the W4A8 row only
LDM_CONFIGS = [
    (r, b)
    for b in ("w8a8", "w4a8")
    for r in ("minmax", "modelopt-int8", "qdiffusion", "dmq", "efficientdm", "mpqdm", "tcaq")
    if (r, b) != ("modelopt-int8", "w4a8")
] + [("qua2sedimo", "w4a8")]


@dataclass(frozen=True)
class AblationSet:
    """One component changed at a time from a full recipe (whose own row is the reference): the
    bits, the full recipe's choice per component, (component, variant, overrides), and the
    baseline row shown above them (recipe, label)."""

    bits: str
    full: dict
    variants: list
    reference: tuple


ABLATIONS = {
    "dmq": AblationSet(
        "w4a8",
        {
            "equivalent scaling": "LES",
            "timestep weighting": "adaptive",
            "PTS": "voted",
            "PTS layers": "skip convs only",
        },
        [
            ("equivalent scaling", "none (tau = 1)", {"les": {"iters": 0, "init": "one"}}),
            ("equivalent scaling", "SmoothQuant heuristic (alpha 0.5)", {"les": {"iters": 0, "init": "smoothquant"}}),
            (
                "timestep weighting",
                "uniform",
                {"les": {"timestep_weighting": "uniform"}, "reconstruct": {"timestep_weighting": "uniform"}},
            ),
            (
                "timestep weighting",
                "linear",
                {"les": {"timestep_weighting": "linear"}, "reconstruct": {"timestep_weighting": "linear"}},
            ),
            ("PTS", "none", {"pts": {"max_k": 0}}),
            ("PTS", "MSE-selected", {"pts": {"select": "mse"}}),
            ("PTS layers", "all layers (voted)", {"pts": {"layers": ["all"]}}),
        ],
        ("qdiffusion", "qdiffusion W4A8"),
    ),
    "mpqdm": AblationSet(
        "w2a4",
        {"OMQ": "g in 0..5 by output MSE", "OMQ channels": "by kurtosis", "TRD": "on, graph kept"},
        [
            ("OMQ", "off (uniform N bits)", {"omq": {"max_g": 0}}),
            ("OMQ", "g in {0, 1} (released code)", {"omq": {"search": "official"}}),
            ("OMQ channels", "random", {"omq": {"select": "random"}}),
            ("TRD", "off", {"efficientdm": {"trd": "off"}}),
            ("TRD", "detached (released code)", {"efficientdm": {"trd": "detached"}}),
        ],
        ("efficientdm", "efficientdm W2A4 (OMQ and TRD off)"),
    ),
}
KEYS = ("model", "recipe", "bits", "graph", "n_samples")
PEER = "ModelOpt int8-smoothquant (peer)"


def _row(model, recipe, bits, graph, scores, n, parity=None, **extra) -> dict:
    d = scores.to_dict()
    return {
        "model": model,
        "recipe": recipe,
        "bits": bits,
        "graph": graph,
        "fd": d["fd"],
        "accuracy": d["accuracy"],
        "psnr": d.get("psnr"),
        "ssim": d.get("ssim"),
        "parity_max_step_error": parity,
        "n_samples": n,
        **extra,
        **({"fd_fp": d["fd_fp"]} if "fd_fp" in d else {}),
    }


def calib_denoiser(model: str, d):
    """The denoiser that calibration and quantization see. digits-ldm's is loaded with the
    calibration phrasings (``CALIB_TEMPLATES``) so that the evaluation prompts ("a handwritten
    seven") stay held out; the class-label models have no phrasing to hold out."""
    if model != "digits-ldm":
        return d
    from diffquant.zoo.ldm import CALIB_TEMPLATES, ldm_prompts

    return load_denoiser("builtin:digits-ldm", LoadConfig(prompts=[p for t in CALIB_TEMPLATES for p in ldm_prompts(t)]))


class Bench:
    """One model's shared state: calibration data, the sample batch, FP samples, the scorer.
    ``d`` is the evaluated denoiser (its prompts sample and export); ``qd`` the one calibration
    collects from and the passes run with (digits-ldm: other prompts, see `calib_denoiser`)."""

    def __init__(self, model: str, n: int, n_fq: int, *, progress: bool) -> None:
        self.model, self.n, self.n_fq, self.progress = model, n, n_fq, progress
        self.d = load_denoiser(f"builtin:{model}")
        self.qd = calib_denoiser(model, self.d)
        self.calib = collect(self.qd, CalibConfig(samples=64, steps=25, timesteps=25, guidance=3.0), progress=progress)
        self.batch = prompt_batch(self.d, n, 0)
        self.clf = load_classifier()
        self.real, _ = load_digits_tensor()
        self.fp = self.sample(self.d, n, "FP")
        self.prefix_plans: dict[str, QuantPlan] = {}

    def sample(self, eps, n: int, desc: str) -> torch.Tensor:
        """Images of the first ``n`` samples from ``eps``: a torch denoiser or an engine's eps function."""
        fn = torch_eps_fn(eps) if isinstance(eps, torch.nn.Module) else eps
        cfg = SamplerConfig(steps=25, guidance=3.0, batch_size=250)
        return self.d.to_images(
            sample(fn, self.d, self.batch.take(slice(0, n)), cfg, desc=desc, progress=self.progress)
        )

    def score(self, imgs: torch.Tensor, *, reference: bool = True):
        """Scores vs the real digits (FD, accuracy) and vs the FP samples of the same seeds."""
        n = len(imgs)
        return score_samples(
            imgs, self.batch.ids[:n], self.clf, self.real, reference=self.fp[:n] if reference else None
        )


BULKY = (
    "assignment",
    "effects",
    "importance",
    "held_out",
)  # per-layer / per-configuration lists: in the run's plan, not the table
TRAILING = ("pts", "daq")  # cheap last passes: variants differing only in them share the plan before them


def _quantize(b: Bench, recipe: Recipe, bits: str) -> QuantPlan:
    """quantize(), sharing the work before a recipe's trailing `pts` / `daq` passes between
    variants that differ only in them (the PTS and DAQ ablation rows reuse the full row's plan)."""
    n = len(recipe.passes)
    while n and recipe.passes[n - 1][0] in TRAILING:
        n -= 1
    if n == len(recipe.passes):
        return quantize(b.qd, recipe, b.calib, bits=bits, progress=b.progress)
    prefix = copy.copy(recipe)
    prefix.passes = recipe.passes[:n]
    key = json.dumps([bits, prefix.to_dict()], sort_keys=True, default=str)
    if key not in b.prefix_plans:
        b.prefix_plans[key] = quantize(b.qd, prefix, b.calib, bits=bits, progress=b.progress)
    plan = copy.deepcopy(b.prefix_plans[key])
    plan.state, plan.recipe = "calibrating", recipe.to_dict()
    ctx = PassContext(denoiser=b.qd, plan=plan, calib=b.calib, progress=b.progress)
    for name, cfg in recipe.passes[n:]:
        get_pass(name)[1](ctx, cfg)
    plan.freeze()
    return plan


def run_recipe(
    b: Bench, recipe_name: str | Recipe, bits: str, grids: Path, overrides: dict, label: str = "", **extra
) -> list[dict]:
    """Deployed (N) and fake-quant (N_fq; the research form) rows of one recipe (a shipped name, or
    a `Recipe` built by the caller) at ``bits``."""
    t0 = time.time()
    if isinstance(recipe_name, Recipe):
        recipe, recipe_name = recipe_name, recipe_name.name
    else:
        recipe = load_recipe(
            recipe_name, {k: v for k, v in overrides.items() if any(n == k for n, _ in load_recipe(recipe_name).passes)}
        )
    plan = _quantize(b, recipe, bits)
    quantize_s = time.time() - t0
    fq, fq_graph = fake_quant_forms(b.d, plan, "onnxruntime")  # research form (sampled) and deployed form (parity)
    with tempfile.TemporaryDirectory() as tmp:
        exp = export(plan, b.d, Path(tmp), target="onnxruntime")
        size_mb = sum(p.stat().st_size for p in exp.graphs) / 2**20
        inputs = pick_inputs(b.calib, 4, 8, plan.group_of, plan.n_groups)
        parity = merge_parity(
            [
                check_parity(fq_graph, onnx.load(str(p)), [i for i in inputs if plan.group_of(i[0]) == g])
                for g, p in enumerate(exp.graphs)
            ]
        )
        with GroupedEngine([OrtEngine(p, qdq_fusion=True) for p in exp.graphs], exp.timestep_groups) as eng:
            deployed = b.sample(engine_eps_fn(eng, 512), b.n, f"{recipe_name} {bits} deployed")
    fq_imgs = b.sample(fq, b.n_fq, f"{recipe_name} {bits} fake-quant")
    name = label or recipe_name
    save_grid(deployed[:50], grids / f"{b.model}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{bits}.png")
    common = dict(
        parity=parity.max_step_error,
        quantize_s=round(quantize_s, 1),
        parity_cosine_min=parity.cosine_min,
        onnx_mb=round(size_mb, 2),
        **extra,
    )
    if "qua2sedimo" in plan.recipe:  # the searched assignment's bits, predictor fit and search time
        common["qua2sedimo"] = {k: v for k, v in plan.recipe["qua2sedimo"].items() if k not in BULKY}
    if overrides:
        common["overrides"] = overrides
    return [
        _row(b.model, name, bits, "deployed", b.score(deployed), b.n, **common),
        _row(b.model, name, bits, "fake_quant", b.score(fq_imgs), b.n_fq, **common),
    ]


def run_modelopt_peer(b: Bench) -> list[dict]:
    """ModelOpt's INT8 SmoothQuant (alpha 0.8) fake-quant with its diffusers example's skip filter,
    calibrated by running our calibration batches through it. Its diffusers example's min-mean
    conv calibrator lives in the example folder, not the package, so convs use max here."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        print("nvidia-modelopt is not installed (pip install .[peers]): no ModelOpt peer row", file=sys.stderr)
        return []
    model = copy.deepcopy(b.d)
    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    cfg["algorithm"] = {"method": "smoothquant", "alpha": 0.8}

    def loop(_m) -> None:
        for _, inputs in b.calib.batches(256):
            model(**inputs)

    t0 = time.time()
    mtq.quantize(model.model, cfg, forward_loop=loop)
    skip = re.compile(
        r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|pos_embed|time_text_embed|context_embedder|norm_out|x_embedder|timestep_embedder|proj_out_).*"
    )
    mtq.disable_quantizer(model.model, lambda name: skip.match(name) is not None)
    quantize_s = time.time() - t0
    imgs = b.sample(model, b.n_fq, "ModelOpt fake-quant")
    import modelopt

    return [
        _row(
            b.model,
            PEER,
            "w8a8",
            "fake_quant",
            b.score(imgs),
            b.n_fq,
            quantize_s=round(quantize_s, 1),
            peer=f"nvidia-modelopt {modelopt.__version__}",
        )
    ]


def write_markdown(rows: list[dict], path: Path) -> None:
    lines = [
        "# Digits quality table",
        "",
        "Generated by `python benchmarks/quality.py` (docs/ARCHITECTURE.md protocol: DDIM 25 steps, CFG 3, seeds "
        "fixed, equal",
        "samples per class). **deployed**: the onnxruntime-target Q/DQ graph run by ONNX Runtime with its fused "
        "integer",
        "kernels; **fake_quant**: the torch fake-quant model built from the same plan. PSNR/SSIM are against the FP "
        "samples",
        "of the same seeds; parity is the largest local quantizer error of the graph vs fake-quant, in steps "
        "(contract: <= 1).",
        "The FP row is the torch FP32 model (the FP32 ONNX graph matches it to SNR > 100 dB). The ModelOpt peer row is",
        "ModelOpt's own torch simulation (not exported). FD is biased upward at small N: compare FD only between rows",
        "of equal N (the fake-quant rows use N = 250, the deployed rows N = 1000). `quantize s` is wall time on the",
        "benchmark machine, including whatever else ran beside it.",
        "",
        "`FD to FP` (the leading quality column) is the Frechet distance between a row's samples and the FP samples of",
        "the same seeds (same classifier features; measured where the column is filled): unlike FD to the real digits,",
        "which on digits-sd rewards drifting away from FP, it grows with every departure from the FP model.",
        "",
        "| model | recipe | bits | graph | N | FD to FP | FD | acc | PSNR | SSIM | parity steps | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['bits']} | {r['graph']} | {r['n_samples']} | {f(r.get('fd_fp'), 1)} "
            f"| {f(r['fd'], 1)} | {f(r['accuracy'], 3)} | "
            f"{f(r['psnr'])} | {f(r['ssim'], 3)} | {f(r['parity_max_step_error'], 0)} | {f(r.get('quantize_s'), 0)} |"
        )
    lines += ["", "## Sample grids", "", "First 50 samples of each deployed row (same seeds in every grid).", ""]
    for r in rows:
        if r["graph"] == "deployed":
            bits = "" if r["bits"] == "-" else f"-{r['bits']}"
            name = f"{r['model']}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', r['recipe'])}{bits}.png"
            if (path.parent / "quality" / name).exists():
                lines += [
                    f"**{r['model']} {r['recipe']} {r['bits']}**",
                    "",
                    f"![{r['model']} {r['recipe']} {r['bits']}](quality/{name})",
                    "",
                ]
    write_text_atomic(path, "\n".join(lines))


def write_ablation_markdown(rows: list[dict], recipe: str, path: Path) -> None:
    """<recipe>_ablation.md: per model, the baseline and the full recipe's row, then each variant
    (one component changed), deployed and fake-quant side by side, FD to FP first."""
    ab = ABLATIONS[recipe]
    bits = ab.bits.upper()
    lines = [
        f"# {recipe} ablation ({bits})",
        "",
        "Generated by `python benchmarks/quality.py` (rows in quality.json with an `ablation` key). Each variant",
        f"changes one component of the full `{recipe}` recipe: "
        + "; ".join(f"{k} = {v}" for k, v in ab.full.items())
        + ".",
        "**deployed**: the onnxruntime-target graph run by ONNX Runtime (fused kernels), N as in the quality table;",
        "**fake-quant**: the torch model of the same plan (smaller N: compare FD only within a column).",
        "FD to FP, PSNR and SSIM are against the FP samples of the same seeds.",
        "",
    ]
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    by = {(r["model"], r["recipe"], r["bits"], r["graph"]): r for r in rows}
    prefix = f"{recipe} ablation: "
    for model in sorted({r["model"] for r in rows if r.get("ablation") and r["recipe"].startswith(prefix)}):
        lines += [
            f"## {model}",
            "",
            "| component | variant | FD to FP | FD | PSNR | SSIM | fake-quant FD to FP | fake-quant PSNR | parity "
            "steps | quantize s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        refs = [
            ("reference", ab.reference[1], ab.reference[0]),
            (f"full {recipe}", "; ".join(ab.full.values()), recipe),
        ]
        refs += [
            (r["ablation"].split(": ")[0], r["ablation"].split(": ", 1)[1], r["recipe"])
            for r in rows
            if r["model"] == model and r["recipe"].startswith(prefix) and r["graph"] == "deployed"
        ]
        for comp, variant, name in refs:
            d, q = by.get((model, name, ab.bits, "deployed")), by.get((model, name, ab.bits, "fake_quant"))
            if d is None:
                continue
            lines.append(
                f"| {comp} | {variant} | {f(d.get('fd_fp'), 1)} | {f(d['fd'], 1)} | {f(d['psnr'])} | "
                f"{f(d['ssim'], 3)} | "
                f"{f(q.get('fd_fp'), 1) if q else '-'} | {f(q['psnr']) if q else '-'} | "
                f"{f(d['parity_max_step_error'], 0)} | {f(d.get('quantize_s'), 0)} |"
            )
        lines.append("")
    if len(lines) > 8:
        write_text_atomic(path, "\n".join(lines))


def write_all_markdown(rows: list[dict], out: Path) -> None:
    write_markdown(rows, out / "quality.md")
    for recipe in ABLATIONS:
        write_ablation_markdown(rows, recipe, out / f"{recipe}_ablation.md")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def open_results(out_dir: str) -> tuple[Path, Path, Path, list[dict]]:
    """The results folder, its grid folder (created), quality.json's path and its rows so far."""
    out = Path(out_dir)
    grids = out / "quality"
    grids.mkdir(parents=True, exist_ok=True)
    jpath = out / "quality.json"
    return out, grids, jpath, json.loads(jpath.read_text()) if jpath.exists() else []


def add_fp_row(b: Bench, rows: list[dict], grids: Path) -> None:
    """The model's FP row (scored against the real digits) and grid, unless ``rows`` has it."""
    if (b.model, "fp", "-", "deployed", b.n) not in {tuple(r[k] for k in KEYS) for r in rows}:
        rows.append(_row(b.model, "fp", "-", "deployed", b.score(b.fp, reference=False), b.n))
        save_grid(b.fp[:50], grids / f"{b.model}-fp.png")


def merge_rows(rows: list[dict], new: list[dict]) -> None:
    """Put ``new`` into ``rows`` in place, replacing rows with the same key."""
    keys = {tuple(r[k] for k in KEYS) for r in new}
    rows[:] = [r for r in rows if tuple(r[k] for k in KEYS) not in keys] + new


def common_args(doc: str, only: str) -> argparse.ArgumentParser:
    """The options every quality benchmark shares; ``only`` says what ``--only`` lists."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000, help="N for the deployed rows (published tables: 1000)")
    ap.add_argument(
        "--fq-samples",
        type=int,
        default=250,
        help="N for the fake-quant rows (torch fake-quant sampling is the slow part)",
    )
    ap.add_argument("--models", default="digits-sd,digits-dit")
    ap.add_argument("--only", default="", help=f"comma list of {only} (default: all rows)")
    ap.add_argument("--out", default=str(RESULTS))
    return ap


def main() -> int:
    ap = common_args(__doc__, "recipe:bits")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PASS.OPTION=VALUE",
        help="pass option overrides (smoke tests)",
    )
    ap.add_argument(
        "--peers", action="store_true", help="with --only: run the ModelOpt peer too (recomputed with --force)"
    )
    ap.add_argument("--label", default="", help="with --only and --set: the recipe name the rows get (a variant)")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite quality.md from quality.json and stop")
    ap.add_argument("--force", action="store_true", help="with --only: recompute rows that exist already")
    ap.add_argument(
        "--ablations",
        default=None,
        help="models that get the ablation rows (default: both models, none with --only; '' for none)",
    )
    ap.add_argument(
        "--ablation-recipes",
        default=",".join(ABLATIONS),
        help=f"which recipes' ablations run (default: {','.join(ABLATIONS)})",
    )
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    overrides = parse_overrides(a.overrides)
    out = Path(a.out)
    grids = out / "quality"
    grids.mkdir(parents=True, exist_ok=True)
    jpath = out / "quality.json"
    rows = json.loads(jpath.read_text()) if jpath.exists() else []
    have = {tuple(r[k] for k in KEYS) for r in rows}
    if a.markdown_only:
        write_all_markdown(rows, out)
        return 0
    ablate = set(
        filter(None, (a.ablations if a.ablations is not None else ("" if a.only else a.models)).split(","))
    ) - {"digits-ldm"}
    ablation_recipes = set(filter(None, a.ablation_recipes.split(",")))
    torch.manual_seed(0)

    def add(new: list[dict]) -> None:
        for r in new:
            rows[:] = [x for x in rows if tuple(x[k] for k in KEYS) != tuple(r[k] for k in KEYS)] + [r]
            print(
                f"{r['model']:10s} {r['recipe']:14s} {r['bits']:5s} {r['graph']:10s} N={r['n_samples']:4d} FD "
                f"{r['fd']:7.1f} acc {r['accuracy']:.3f} PSNR {r['psnr'] or 0:6.2f}",
                flush=True,
            )
        write_json(jpath, rows)
        write_all_markdown(rows, out)

    for model in a.models.split(","):
        b = Bench(model, a.samples, a.fq_samples, progress=not a.quiet)
        if (model, "fp", "-", "deployed", a.samples) not in have:
            add([_row(model, "fp", "-", "deployed", b.score(b.fp, reference=False), a.samples)])
            save_grid(b.fp[:50], grids / f"{model}-fp.png")
        for recipe, bits in (
            [tuple(c.split(":")) for c in a.only.split(",")]
            if a.only
            else LDM_CONFIGS
            if model == "digits-ldm"
            else CONFIGS
        ):
            if (model, a.label or recipe, bits, "deployed", a.samples) in have and not a.force:
                continue
            add(run_recipe(b, recipe, bits, grids, overrides, a.label))
        for recipe in [r for r in ABLATIONS if r in ablation_recipes] if model in ablate else []:
            ab = ABLATIONS[recipe]
            for component, variant, ov in ab.variants:
                label = f"{recipe} ablation: {component} = {variant}"
                if (model, label, ab.bits, "deployed", a.samples) not in have or a.force:
                    merged = {k: {**ov.get(k, {}), **overrides.get(k, {})} for k in {*ov, *overrides}}
                    add(run_recipe(b, recipe, ab.bits, grids, merged, label, ablation=f"{component}: {variant}"))
        peer_missing = (model, PEER, "w8a8", "fake_quant", a.fq_samples) not in have
        if (a.peers and (peer_missing or a.force)) or (not a.only and peer_missing):
            add(run_modelopt_peer(b))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
