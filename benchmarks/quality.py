"""The digits quality table (the protocol of docs/ARCHITECTURE.md, "Measuring quality"): every
recipe x bit setting on both builtin models, measured on the deployed graph (the
``onnxruntime``-target Q/DQ graph run by ONNX Runtime with its fused integer kernels: what this CPU
machine deploys), with the torch fake-quant numbers beside them.

    python benchmarks/quality.py                       # N = 1000, both models, every row
    python benchmarks/quality.py --samples 100 --only minmax:w8a8,qdiffusion:w4a8
    python benchmarks/quality.py --models digits-ldm     # the latent text-to-image builtin (LDM_CONFIGS)
    # the replicates the README's claims read: each paper's pair and W4A8 of every recipe, calibration
    # seeds 0, 1, 2, one process per seed, two at a time (rows saved as each finishes; rerun to resume)
    python benchmarks/quality.py --models digits-dit --replicates --seeds 0,1,2 --jobs 2
    python benchmarks/quality.py --quick --replicates --models digits-dit   # N = 250 / 100, seeds 0,1
    python benchmarks/quality.py --markdown-only         # quality.md and the README's block from the rows

Every row records the commit it was computed at, its calibration and sampling seeds and a hash of its
settings; only rows of today's code (same ``src/`` as HEAD, or proven identical by
benchmarks/results/fingerprint.json) enter the tables and verdicts, older ones are listed as stale.

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
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import (  # noqa: E402
    OLD_CALIB_SEED,
    current,
    group_rows,
    head_commit,
    interval,
    key_of,
    save_rows,
    settings_hash,
    table_rows,
    verdict,
)

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
PEER = "ModelOpt int8-smoothquant (peer)"
FLOOR = "FP, another sampling seed"
FLOOR_SEEDS = (1, 2, 3)  # sampling seeds of the noise floor (the FP reference samples with seed 0)
# each paper's own comparison (recipe label, bits) vs (recipe label, bits): the verdicts the README prints
PAIRS = [
    ("DMQ", ("dmq", "w4a8"), ("qdiffusion", "w4a8")),
    ("MPQ-DM", ("mpqdm", "w2a4"), ("efficientdm", "w2a4")),
    ("Qua2SeDiMo", ("qua2sedimo", "w4a8"), ("uaq uniform W4", "w4a8")),
    ("TCAQ-DM", ("tcaq", "w4a6"), ("qdiffusion", "w4a6")),
]
# rows with a label of their own: a recipe run with overrides (the labels benchmarks/qua2sedimo.py uses)
VARIANTS = {"uaq uniform W4": ("qua2sedimo", {"qua2sedimo": {"search": "uniform", "uniform": 4}})}
# the rows the replicate tables need (besides PAIRS): W4A8 of every recipe
W4A8 = [(r, "w4a8") for r in ("minmax", "qdiffusion", "dmq", "efficientdm", "mpqdm", "tcaq", "qua2sedimo")]
PAIR_ROWS = [x for _, a, b in PAIRS for x in (a, b)]


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

    def __init__(
        self, model: str, n: int, n_fq: int, *, progress: bool, calib_seed: int = OLD_CALIB_SEED, sample_seed: int = 0
    ) -> None:
        self.model, self.n, self.n_fq, self.progress = model, n, n_fq, progress
        self.calib_seed, self.sample_seed, self.first_seed = calib_seed, sample_seed, calib_seed
        self.d = load_denoiser(f"builtin:{model}")
        self.qd = calib_denoiser(model, self.d)
        self.calib_cfg = CalibConfig(samples=64, steps=25, timesteps=25, guidance=3.0, seed=calib_seed)
        self.calib = collect(self.qd, self.calib_cfg, progress=progress)
        self.batch = prompt_batch(self.d, n, sample_seed)
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

    def row(self, recipe: str, bits: str, graph: str, scores, n: int, settings: dict, **extra) -> dict:
        """One result row: what was measured, its scores, and where it came from (the commit, the
        calibration and sampling seeds, a hash of its settings)."""
        d = scores.to_dict()
        seeds = {"calib_seed": self.calib_seed, "sample_seed": self.sample_seed}
        return {
            "model": self.model,
            "recipe": recipe,
            "bits": bits,
            "graph": graph,
            "n_samples": n,
            "replicate": extra.pop("replicate", self.calib_seed),
            "fd": d["fd"],
            "accuracy": d["accuracy"],
            "psnr": d.get("psnr"),
            "ssim": d.get("ssim"),
            "parity_max_step_error": extra.pop("parity", None),
            **{k: d[k] for k in ("fd_fp", "psnr_sd", "ssim_sd") if k in d},
            **extra,
            **seeds,
            "commit": head_commit(),
            "settings": settings_hash({**settings, **seeds, "n": n, "graph": graph, "calib": asdict(self.calib_cfg)}),
        }


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
    if b.calib_seed == b.first_seed:  # one grid per row (the first replicate's)
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
    settings = {"recipe": recipe.to_dict(), "bits": bits, "overrides": overrides}
    return [
        b.row(name, bits, "deployed", b.score(deployed), b.n, settings, **common),
        b.row(name, bits, "fake_quant", b.score(fq_imgs), b.n_fq, settings, **common),
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

    peer = f"nvidia-modelopt {modelopt.__version__}"
    settings = {"peer": peer, "alpha": 0.8, "skip": skip.pattern}
    return [
        b.row(PEER, "w8a8", "fake_quant", b.score(imgs), b.n_fq, settings, quantize_s=round(quantize_s, 1), peer=peer)
    ]


INTRO = """# Digits quality table

Generated by `python benchmarks/quality.py` (docs/ARCHITECTURE.md protocol: DDIM 25 steps, CFG 3, sampling
seed 0 shared by every row of a model, equal samples per class). **deployed**: the onnxruntime-target Q/DQ graph
run by ONNX Runtime with its fused integer kernels; **fake_quant**: the torch fake-quant model built from the same
plan (smaller N: compare FD only between rows of equal N). FD to FP, PSNR and SSIM are against the FP samples of
the same seeds; FD to FP leads (it grows with every departure from the FP model; FD to the real digits can reward
drifting away from FP on digits-sd). Parity: the largest local quantizer error of the graph vs fake-quant, in steps
(contract: <= 1), the worst over seeds.

Each row is the mean ± the half-width of a 95 % Student-t interval over its replicates (calibration seeds; n of
them), from rows computed by today's code only. `PSNR sd` is the spread of the per-image PSNR over the images
(mean over replicates). Each model's table starts with its noise floor: FP samples from other sampling seeds
scored against the FP samples; a quantized row whose mean FD to FP is below the floor's is marked **≈ FP**
(indistinguishable from FP at this N). Verdicts: "A beats B" only where the paired difference over the seeds both
ran with has an interval excluding 0 (`diffquant.eval.stats.paired_verdict`), else "within noise".
"""


def _cell(group: list[dict] | None, metric: str, digits: int = 1) -> str:
    iv = interval(group, metric) if group else None
    return "-" if iv is None else iv.text(digits).replace(f" (n = {iv.n})", "")


def _line(label: str, bits: str, graph: str, n: int, group: list[dict], floor: float | None) -> str:
    fd = interval(group, "fd_fp")
    near = " **≈ FP**" if fd is not None and floor is not None and graph != "fp" and fd.mean < floor else ""
    parity = max(
        (r["parity_max_step_error"] for r in group if r.get("parity_max_step_error") is not None), default=None
    )
    sd = [r["psnr_sd"] for r in group if r.get("psnr_sd") is not None]
    q_s = [r["quantize_s"] for r in group if r.get("quantize_s") is not None]
    cells = [
        label,
        bits,
        graph,
        str(n),
        str(len(group)),
        _cell(group, "fd_fp") + near,
        _cell(group, "psnr", 2),
        "-" if not sd else f"{sum(sd) / len(sd):.2f}",
        _cell(group, "ssim", 4),
        _cell(group, "accuracy", 3),
        _cell(group, "fd"),
        "-" if parity is None else f"{parity:.0f}",
        "-" if not q_s else f"{sum(q_s) / len(q_s):.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def verdict_lines(groups: dict, model: str, n: int) -> list[str]:
    """Each paper's own comparison on ``model`` (deployed graph, N = ``n``): the paired verdict on
    FD to FP and on PSNR, with the mean difference and its interval."""
    out = []
    for paper, a, b in PAIRS:
        ka, kb = (model, *a, "deployed", n), (model, *b, "deployed", n)
        if ka not in groups or kb not in groups:
            continue
        for metric, lower in (("fd_fp", True), ("psnr", False)):
            v = verdict(groups, ka, kb, metric, lower_is_better=lower)
            name = "FD to FP" if metric == "fd_fp" else "PSNR"
            diff = f"; {a[0]} - {b[0]} = {v.diff.text(2)}" if v.diff is not None else ""
            out.append(f"- {paper} ({a[1].upper()}): {v.text.replace(metric, name)}{diff}, seeds {v.seeds}")
    return out


def write_markdown(rows: list[dict], path: Path) -> None:
    groups = group_rows(rows)
    lines = [INTRO]
    order = {c: i for i, c in enumerate(dict.fromkeys([("fp", "-"), (FLOOR, "-"), *PAIR_ROWS, *W4A8, *CONFIGS]))}
    for model in dict.fromkeys(k[0] for k in groups):
        keys = sorted((k for k in groups if k[0] == model), key=lambda k: (order.get(k[1:3], 999), k[1:3], k[3], -k[4]))
        n = max((k[4] for k in keys if k[3] == "deployed"), default=0)
        floor = interval(groups.get((model, FLOOR, "-", "fp", n), []), "fd_fp")
        lines += [
            f"## {model}",
            "",
            "| recipe | bits | graph | N | seeds | FD to FP | PSNR | PSNR sd | SSIM | acc | FD | parity steps | "
            "quantize s |",
            "|" + "---|" * 13,
        ]
        lines += [_line(k[1], k[2], k[3], k[4], groups[k], floor.mean if floor else None) for k in keys]
        verdicts = verdict_lines(groups, model, n)
        lines += [
            "",
            f"Verdicts on {model} (deployed, N = {n}):",
            "",
            *(verdicts or ["- none yet: no pair has rows"]),
            "",
        ]
    stale = [r for r in rows if not current(r)]
    if stale:
        lines += _stale_table(stale)
    lines += _grids_section(rows, path)
    write_text_atomic(path, "\n".join(lines))


def _stale_table(stale: list[dict]) -> list[str]:
    """Rows from older code: shown for the record, left out of the tables above and every verdict."""
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [
        "## Stale rows (older code; left out of the tables and verdicts above)",
        "",
        f"{len(stale)} rows computed by code other than today's (every row from before rows recorded their commit is",
        "one). They are kept until re-run at this commit.",
        "",
        "| model | recipe | bits | graph | N | seed | FD to FP | FD | acc | PSNR | SSIM | commit |",
        "|" + "---|" * 12,
    ]
    for r in stale:
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['bits']} | {r['graph']} | {r['n_samples']} | "
            f"{key_of(r)[-1]} | {f(r.get('fd_fp'), 1)} | {f(r['fd'], 1)} | {f(r['accuracy'], 3)} | {f(r['psnr'])} | "
            f"{f(r['ssim'], 3)} | {(r.get('commit') or 'not recorded')[:10]} |"
        )
    return [*lines, ""]


def _grids_section(rows: list[dict], path: Path) -> list[str]:
    lines = ["## Sample grids", "", "First 50 samples of each deployed row (same sampling seed in every grid).", ""]
    seen = set()
    for r in rows:
        if r["graph"] != "deployed" or (r["model"], r["recipe"], r["bits"]) in seen:
            continue
        seen.add((r["model"], r["recipe"], r["bits"]))
        bits = "" if r["bits"] == "-" else f"-{r['bits']}"
        name = f"{r['model']}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', r['recipe'])}{bits}.png"
        if (path.parent / "quality" / name).exists():
            title = f"{r['model']} {r['recipe']} {r['bits']}"
            lines += [f"**{title}**", "", f"![{title}](quality/{name})", ""]
    return lines


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


README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- replicates:begin (generated by benchmarks/quality.py) -->", "<!-- replicates:end -->"
MODELS = ("digits-sd", "digits-dit", "digits-ldm")


def readme_block(rows: list[dict]) -> str:
    """The README's paper claims, from today's rows only: per model its noise floor, each paper's
    own pair (mean ± 95 % t-interval over calibration seeds, deployed graph) and the paired
    verdict; W4A8 of every recipe where it was replicated."""
    groups = group_rows(rows)
    lines = [BEGIN, ""]
    for model in [m for m in MODELS if any(k[0] == m for k in groups)]:
        n = max((k[4] for k in groups if k[0] == model and k[3] == "deployed"), default=0)
        floor = interval(groups.get((model, FLOOR, "-", "fp", n), []), "fd_fp")
        lines += [
            f"**{model}** (deployed graph, N = {n}; noise floor FD to FP {floor.text(1) if floor else 'not measured'})",
            "",
        ]
        lines += ["| row | seeds | FD to FP | PSNR | SSIM |", "|---|---|---|---|---|"]
        shown = [c for c in dict.fromkeys([*PAIR_ROWS, *W4A8]) if (model, *c, "deployed", n) in groups]
        for label, bits in shown:
            g = groups[(model, label, bits, "deployed", n)]
            lines.append(
                f"| {label} {bits} | {len(g)} | {_cell(g, 'fd_fp')} | {_cell(g, 'psnr', 2)} | {_cell(g, 'ssim', 4)} |"
            )
        lines += ["", *(verdict_lines(groups, model, n) or ["- no paper pair re-measured yet"]), ""]
    if len(lines) == 2:
        lines += [
            "No row has been re-measured with replicates at today's code yet: every earlier claim is withdrawn",
            "",
        ]
    when = sorted({r["commit"][:10] for g in groups.values() for r in g}) or ["-"]
    lines += [
        f"Rows: computed at {', '.join(when)}; mean ± half-width of the 95 % Student-t interval over calibration "
        "seeds. A verdict needs the paired difference's interval to exclude 0 (`diffquant.eval.stats`).",
        "",
        END,
    ]
    return "\n".join(lines)


def update_readme(rows: list[dict], path: Path = README) -> bool:
    """Rewrite the README's generated block (between its markers) from ``rows``; False without markers."""
    if not path.exists():
        return False
    text = path.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    write_text_atomic(path, head + readme_block(rows) + rest.split(END, 1)[1])
    return True


def write_all_markdown(rows: list[dict], out: Path) -> None:
    write_markdown(rows, out / "quality.md")
    if out.resolve() == RESULTS.resolve():  # the published results: the README quotes them
        update_readme(rows)
    for recipe in ABLATIONS:  # single-number tables: one replicate per row, today's where there is one
        write_ablation_markdown(table_rows(rows, 0), recipe, out / f"{recipe}_ablation.md")


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


def fp_rows(b: Bench, grids: Path) -> list[dict]:
    """The model's FP row (scored against the real digits) and its noise floor: FP samples of
    other sampling seeds scored against the FP samples of the reference seed (a quantized row
    closer to FP than these is indistinguishable from FP at this N)."""
    if b.calib_seed == b.first_seed:
        save_grid(b.fp[:50], grids / f"{b.model}-fp.png")
    settings = {"fp": True, "sample_seed": b.sample_seed}
    rows = [b.row("fp", "-", "deployed", b.score(b.fp, reference=False), b.n, settings, replicate=b.sample_seed)]
    for seed in FLOOR_SEEDS:
        other = b.d.to_images(
            sample(
                torch_eps_fn(b.d),
                b.d,
                prompt_batch(b.d, b.n, seed),
                SamplerConfig(steps=25, guidance=3.0, batch_size=250),
                desc=f"FP, sampling seed {seed}",
                progress=b.progress,
            )
        )
        rows.append(b.row(FLOOR, "-", "fp", b.score(other), b.n, {**settings, "other_seed": seed}, replicate=seed))
    return rows


def add_fp_row(b: Bench, rows: list[dict], grids: Path, jpath: Path) -> list[dict]:
    """The model's FP and noise-floor rows, unless current ones exist; the results file's rows."""
    have = {key_of(r) for r in rows if current(r)}
    if (b.model, "fp", "-", "deployed", b.n, b.sample_seed) in have and all(
        (b.model, FLOOR, "-", "fp", b.n, s) in have for s in FLOOR_SEEDS
    ):
        return rows
    return save_rows(jpath, fp_rows(b, grids))


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
    ap.add_argument(
        "--seeds",
        default=str(OLD_CALIB_SEED),
        help="calibration seeds, comma list: one replicate each, each in its own process (e.g. 0,1,2)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="replicate processes at once (threads split between them)")
    ap.add_argument(
        "--quick", action="store_true", help="development profile: N = 250 deployed, 100 fake-quant, seeds 0,1"
    )
    ap.add_argument("--first-seed", default="", help=argparse.SUPPRESS)  # set for the replicate processes
    return ap


def parse_seeds(a: argparse.Namespace) -> list[int]:
    """The calibration seeds asked for (``--quick``: 0, 1 with N = 250 / 100 unless given)."""
    if a.quick:
        a.samples, a.fq_samples = min(a.samples, 250), min(a.fq_samples, 100)
        if a.seeds == str(OLD_CALIB_SEED):
            a.seeds = "0,1"
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    a.first_seed = a.first_seed or str(seeds[0])
    return seeds


def run_seeds(a: argparse.Namespace, seeds: list[int], script: str) -> int:
    """Run ``script`` once per seed (``--jobs`` at a time, the CPU threads split between them),
    forwarding every other option; each process saves its rows as they finish."""
    import os

    argv = [x for x in sys.argv[1:]]
    for flag in ("--seeds", "--jobs", "--first-seed"):
        while flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
        argv = [x for x in argv if not x.startswith(flag + "=")]
    threads = max(1, (os.cpu_count() or 1) // max(1, a.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def one(seed: int) -> int:
        cmd = [sys.executable, script, *argv, "--seeds", str(seed), "--first-seed", str(seeds[0])]
        print(f"replicate: calibration seed {seed}: {' '.join(cmd[1:])}", flush=True)
        return subprocess.run(cmd, env=env, check=False).returncode

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        codes = list(pool.map(one, seeds))
    return 1 if any(codes) else 0


def _args() -> argparse.Namespace:
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
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the markdown from quality.json and stop")
    ap.add_argument("--force", action="store_true", help="with --only: recompute rows that exist already")
    ap.add_argument(
        "--ablations",
        default=None,
        help="models that get the ablation rows (default: both models, none with --only or --replicates; '' for none)",
    )
    ap.add_argument(
        "--ablation-recipes",
        default=",".join(ABLATIONS),
        help=f"which recipes' ablations run (default: {','.join(ABLATIONS)})",
    )
    ap.add_argument(
        "--replicates",
        action="store_true",
        help="the rows the replicate tables read: each paper's own comparison and W4A8 of every recipe",
    )
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args()


def _configs(a: argparse.Namespace, model: str) -> list[tuple[str, str]]:
    if a.only:
        return [tuple(c.split(":")) for c in a.only.split(",")]
    if a.replicates:
        pairs = [x for _, p, q in PAIRS for x in (p, q)] if model != "digits-ldm" else []
        return list(dict.fromkeys(pairs + [c for c in W4A8 if model != "digits-ldm" or c in LDM_CONFIGS]))
    return LDM_CONFIGS if model == "digits-ldm" else CONFIGS


def main() -> int:
    a = _args()
    out, grids, jpath, rows = open_results(a.out)
    seeds = parse_seeds(a)
    if a.markdown_only:
        write_all_markdown(rows, out)
        return 0
    if len(seeds) > 1:  # one process per calibration seed: parallel, and resumable row by row
        return run_seeds(a, seeds, __file__)
    torch.manual_seed(0)
    runner = _Runner(a, out, jpath, rows)
    for model in a.models.split(","):
        runner.model(model, seeds[0], grids)
    return 0


class _Runner:
    """One replicate process: the rows so far (re-read as each is saved), what is missing, and
    each model's rows in order."""

    def __init__(self, a: argparse.Namespace, out: Path, jpath: Path, rows: list[dict]) -> None:
        self.a, self.out, self.jpath, self.rows = a, out, jpath, rows
        self.overrides = parse_overrides(a.overrides)
        models = a.ablations if a.ablations is not None else "" if a.only or a.replicates else a.models
        self.ablate = set(filter(None, models.split(","))) - {"digits-ldm"}

    def add(self, new: list[dict]) -> None:
        self.rows = save_rows(self.jpath, new)
        for r in new:
            print(
                f"{r['model']:10s} {r['recipe']:14s} {r['bits']:5s} {r['graph']:10s} N={r['n_samples']:4d} seed "
                f"{r['replicate']} FD {r['fd']:7.1f} acc {r['accuracy']:.3f} PSNR {r['psnr'] or 0:6.2f}",
                flush=True,
            )
        write_all_markdown(self.rows, self.out)

    def missing(self, b: Bench, label: str, bits: str, graph: str = "deployed", n: int | None = None) -> bool:
        key = (b.model, label, bits, graph, n or self.a.samples, b.calib_seed)
        return self.a.force or key not in {key_of(r) for r in self.rows if current(r)}

    def model(self, model: str, seed: int, grids: Path) -> None:
        a = self.a
        b = Bench(model, a.samples, a.fq_samples, progress=not a.quiet, calib_seed=seed)
        b.first_seed = int(a.first_seed)
        self.rows = add_fp_row(b, self.rows, grids, self.jpath)
        for recipe, bits in _configs(a, model):
            if recipe in VARIANTS and self.missing(b, recipe, bits):
                self.add(run_recipe(b, VARIANTS[recipe][0], bits, grids, VARIANTS[recipe][1], recipe))
            elif recipe not in VARIANTS and self.missing(b, a.label or recipe, bits):
                self.add(run_recipe(b, recipe, bits, grids, self.overrides, a.label))
        for recipe in [r for r in ABLATIONS if r in set(a.ablation_recipes.split(","))] if model in self.ablate else []:
            ab = ABLATIONS[recipe]
            for component, variant, ov in ab.variants:
                label = f"{recipe} ablation: {component} = {variant}"
                if self.missing(b, label, ab.bits):
                    merged = {k: {**ov.get(k, {}), **self.overrides.get(k, {})} for k in {*ov, *self.overrides}}
                    self.add(run_recipe(b, recipe, ab.bits, grids, merged, label, ablation=f"{component}: {variant}"))
        if (a.peers or not (a.only or a.replicates)) and self.missing(b, PEER, "w8a8", "fake_quant", a.fq_samples):
            self.add(run_modelopt_peer(b))


if __name__ == "__main__":
    raise SystemExit(main())
