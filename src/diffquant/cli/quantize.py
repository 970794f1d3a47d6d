"""Commands that decide and export a plan: `demo`, `run`, `calibrate`, `quantize`, `plan`,
`export`, `recipes`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffquant.artifacts import PARTS_FILE, RunReport
from diffquant.cli._args import POSITIVE, add_model, add_recipe, load_model, parse_overrides
from diffquant.errors import DiffquantError
from diffquant.targets import TARGETS, get_target

__all__ = ["add_parsers", "print_summary"]

TARGET_HELP = "graph form: " + "; ".join(f"{t.name} ({t.summary})" for t in TARGETS.values())
REDUCE_RANGE_HELP = (
    "7-bit weight grids (the plan re-quantized; parity judged against it): S8 weights then run exactly and fast on "
    "x86 CPUs without VNNI, where full 8-bit grids need slower U8 weights"
)


def print_summary(report: RunReport, out: str) -> None:
    """What a run measured, one line per model, and why parity failed where it did."""
    from diffquant.eval.report import collapse_note

    q, p = report.quality, report.parity
    collapsed = collapse_note(q)
    print(f"\n{report.model} ({report.family['family']}) {report.recipe} {report.bits} -> {report.onnx}")
    names = {"fd": "FD", "accuracy": "acc", "psnr": "PSNR", "ssim": "SSIM", "latent_cosine": "latent cos"}
    for label, key in (("FP", "fp"), ("fake-quant", "fake_quant"), ("deployed", "quant")):
        vals = "  ".join(f"{names[k]} {q[key][k]:.4g}" for k in names if k in q[key])
        print(f"  {label:11} {vals or '(reference)'}")
    print(
        f"  parity {'PASS' if p['passed'] else 'FAIL'}: local max step error {p['max_step_error']:.3g}, "
        f"cosine min {p['cosine_min']:.6f}, max abs {p['max_abs']:.3g}, flip rate {p['flip_rate']:.2e}"
    )
    for t in p["per_timestep"]:
        if not t["passed"]:
            print(f"  parity fails at timestep {t['timestep']:g}: " + "; ".join(_why(report, t, collapsed)))
    if collapsed and p["passed"]:
        print(f"  note: {collapsed}")
    _print_next(report, Path(out))


def _why(report: RunReport, t: dict, collapsed: str) -> list[str]:
    """Why parity failed at one timestep: a Q/DQ node that disagrees, or drift end to end."""
    p, why = report.parity, []
    if t["max_step_error"] > p["step_tolerance"]:
        why.append(
            f"local step error {t['max_step_error']:.3g} > {p['step_tolerance']:g} "
            "(a Q/DQ node disagrees with fake-quant)"
        )
    if t["cosine"] < p["cosine_threshold"]:
        cause = get_target(report.target).rounding
        because = collapsed or f"{cause} moving inputs across rounding boundaries, propagated; see report.md"
        why.append(
            f"end-to-end cosine {t['cosine']:.6f} < {p['cosine_threshold']:g} "
            f"(flip rate {t['flip_rate']:.2e}: {because})"
        )
    return why


def _print_next(report: RunReport, out: Path) -> None:
    """The files a run wrote and the command that comes next."""
    graphs = ", ".join(Path(g).name for g in report.graphs or [report.onnx])
    parts = ", text encoders, VAE decoder, tokenizers (parts.json)" if (out / PARTS_FILE).exists() else ""
    extra = "".join(f", {f}" for f in report.pass_files if f.endswith(".md"))
    print(f"wrote {out}/: report.md, report.json, {graphs}, unet.fp32.onnx{parts}, plan/, samples_compare.png{extra}")
    if not report.parity["passed"]:
        print(f"next: read {out / 'report.md'} (parity section); the folder is kept so the failure can be inspected")
        return
    from diffquant.engines.backends import get_backend

    cmd, backend = f"diffquant build {out} --out {out / 'engine'}", get_backend(get_target(report.target).backend)
    try:
        backend.require()
    except DiffquantError:  # its runtime is on the machine that serves the engine, not here
        print(f"next: {cmd} --backend {backend.name}   (on the machine that serves it: {backend.summary})")
        return
    print(f"next: {cmd}   ({backend.summary}), then: diffquant generate {out / 'engine'} --prompt ... -n 4")


def cmd_run(a: argparse.Namespace) -> int:
    from diffquant.jobs.run import RunConfig, run_job

    cfg = RunConfig(
        model=a.model,
        prompts=a.prompts,
        resolution=a.resolution,
        recipe=a.recipe,
        bits=a.bits,
        target=a.target,
        out=a.out,
        samples=a.samples,
        steps=a.steps,
        seed=a.seed,
        guidance=a.guidance,
        calib_samples=a.calib_samples,
        progress=not a.quiet,
        parity_cosine=a.parity_cosine,
        timestep_groups=a.timestep_groups,
        overrides=parse_overrides(a.overrides),
        reduce_range=a.reduce_range,
    )
    report = run_job(cfg)
    print_summary(report, a.out)
    return 0 if report.parity["passed"] else 1


def cmd_demo(a: argparse.Namespace) -> int:
    out = a.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = ["run", "--model", "builtin:digits-sd", "--recipe", "minmax", "--bits", "w8a8", "--target", "tensorrt"]
    argv += ["--guidance", "3", "--calib-samples", "32", "--samples", str(a.samples), "--out", out]
    argv += ["--quiet"] if a.quiet else []
    print(
        f"diffquant demo: quantizing builtin:digits-sd to W8A8 (minmax), exporting a TensorRT-ready Q/DQ graph, "
        f"and checking it with ONNX Runtime ({a.samples} samples) -> {out}\n  (the same as: diffquant {' '.join(argv)})"
    )
    return cmd_run(_run_parser(argparse.ArgumentParser(prog="diffquant run")).parse_args(argv[1:]))


def cmd_calibrate(a: argparse.Namespace) -> int:
    from diffquant.calib_data import CalibConfig, collect

    d = load_model(a)
    cfg = CalibConfig(samples=a.samples, steps=a.steps, timesteps=a.timesteps, guidance=a.guidance, seed=a.seed)
    cs = collect(d, cfg, cache_dir=a.cache, progress=not a.quiet)
    print(f"{len(cs)} calibration inputs at {len(cs.timesteps)} timesteps: {cs.folder}")
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from diffquant._io import atomic_folder
    from diffquant.calib_data import CalibConfig, collect, load_calib
    from diffquant.passes import load_recipe, quantize

    d = load_model(a)
    recipe = load_recipe(a.recipe, parse_overrides(a.overrides))
    calib = load_calib(a.calib) if a.calib else collect(d, CalibConfig(samples=a.calib_samples), progress=not a.quiet)
    out = Path(a.out)
    if out.exists():
        raise DiffquantError(f"plan folder {out} already exists; pass another --out or delete it")
    plan = quantize(d, recipe, calib, bits=a.bits, timestep_groups=a.timestep_groups, progress=not a.quiet)
    with atomic_folder(out, "plan folder") as tmp:
        plan.save(tmp)
    n = len(plan.quantized_layers())
    print(f"plan with {n} quantized layers ({plan.bits}, {recipe.name}): {out / 'plan.json'}")
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from diffquant.passes import decide_targets, load_recipe
    from diffquant.quant import QuantPlan, parse_bits

    d = load_model(a)
    if a.plan:
        plan = QuantPlan.load(a.plan)
        rows = [(n, lp.rule, lp.weight, lp.act) for n, lp in plan.layers.items()]
        rows += [(n, r, None, None) for n, r in plan.skipped.items()]
    else:
        recipe = load_recipe(a.recipe, parse_overrides(a.overrides))
        setting = parse_bits(a.bits or recipe.bits)
        rows = []
        for n, dec in decide_targets(d, recipe).items():
            st = parse_bits(dec.bits) if dec.bits else setting
            rows.append((n, dec.rule, st.weight if dec.weights else None, st.act if dec.activations else None))
    width = max(len(r[0]) for r in rows)
    print(f"{'layer':{width}}  {'weights':18} {'activations':18} rule")
    for name, rule, wf, af in rows:
        w, x = ("FP" if f is None else f.label() for f in (wf, af))
        print(f"{name:{width}}  {w:18} {x:18} {rule}")
    n_q = sum(1 for r in rows if r[2] or r[3])
    print(f"{n_q} of {len(rows)} Conv2d/Linear layers quantized")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from diffquant._io import atomic_folder
    from diffquant.exporters import PartsConfig, export
    from diffquant.quant import QuantPlan, reduce_range

    if Path(a.out).exists():
        raise DiffquantError(
            f"export folder {a.out} already exists; pass another --out or delete it (an export never overwrites one)"
        )
    plan = QuantPlan.load(a.plan)
    d = load_model(a)
    with atomic_folder(a.out, "export folder") as tmp:
        if a.reduce_range:  # the re-quantized plan is what parity is judged against: keep it with the graphs
            plan = reduce_range(plan)
            plan.save(tmp / "plan")
        parts = PartsConfig(parts=not a.no_parts, vae_encoder=a.vae_encoder)
        res = export(plan, d, tmp, target=a.target, parts=parts)
    graphs = ", ".join(str(Path(a.out) / p.name) for p in res.graphs)
    print(
        f"{graphs} ({a.target}; {res.lint.n_q} Q / {res.lint.n_dq} DQ nodes per graph, linter clean); "
        f"FP reference {Path(a.out) / res.fp_onnx.name}"
    )
    return 0


def cmd_recipes(a: argparse.Namespace) -> int:
    from diffquant.passes import available_recipes, load_recipe

    for name in available_recipes():
        r = load_recipe(name)
        groups = f", {r.timestep_groups} timestep groups" if r.timestep_groups > 1 else ""
        passes = " -> ".join(n for n, _ in r.passes) or "-"
        print(f"{name:14} {r.bits:6} passes: {passes}{groups}\n{'':21}{r.description}")
    return 0


def _run_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`run`'s options (`demo` parses its fixed settings with the same parser: every other
    option at run's own default)."""
    add_model(p)
    add_recipe(p)
    p.add_argument("--out", required=True, help="run folder to create (it must not exist)")
    p.add_argument("--target", default="tensorrt", choices=list(TARGETS), help=TARGET_HELP)
    p.add_argument(
        "--timestep-groups",
        type=POSITIVE,
        default=None,
        help="G graphs with per-group activation scales (default: the recipe's, 1 for most)",
    )
    p.add_argument("--samples", type=POSITIVE, default=256, help="samples for the quality metrics (equal per class)")
    p.add_argument(
        "--steps", type=POSITIVE, default=25, help="sampler steps (DDIM, or flow-matching Euler for SD3 / Flux)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of every sampled noise (same seed: byte-identical outputs)"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale: CFG, or the input of guidance-distilled models (default: the family's; 3 for the "
        "digits models)",
    )
    p.add_argument(
        "--calib-samples", type=POSITIVE, default=64, help="calibration samples collected along the FP sampler"
    )
    p.add_argument(
        "--parity-cosine", type=float, default=0.99, help="end-to-end cosine a timestep must reach (noise prediction)"
    )
    p.add_argument("--reduce-range", action="store_true", help=REDUCE_RANGE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_run)
    return p


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the builtin model and print where the report is")
    p.add_argument("--out", default=None, help="run folder to create (default: runs/demo-DATE-TIME)")
    p.add_argument("--samples", type=POSITIVE, default=100, help="samples for the quality metrics (equal per class)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)

    _run_parser(
        sub.add_parser("run", help="calibrate, quantize, export, run with ONNX Runtime, check parity and quality")
    )
    _add_stages(sub)


def _add_stages(sub: argparse._SubParsersAction) -> None:
    """The stages one at a time: calibrate, quantize, plan, export, and the recipe list."""
    p = sub.add_parser("calibrate", help="collect calibration data along the FP sampler")
    add_model(p)
    p.add_argument("--samples", type=POSITIVE, default=64, help="calibration samples (sampler trajectories)")
    p.add_argument("--steps", type=POSITIVE, default=25, help="sampler steps of each trajectory")
    p.add_argument("--timesteps", type=POSITIVE, default=25, help="how many evenly spaced sampler steps to keep")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's; 3 for digits)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the calibration noise")
    p.add_argument("--cache", default=None, help="cache folder (default ~/.cache/diffquant/calib or $DIFFQUANT_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("quantize", help="decide a QuantPlan")
    add_model(p)
    add_recipe(p)
    p.add_argument("--calib", default=None, help="calibration folder from `diffquant calibrate` (default: collect)")
    p.add_argument(
        "--calib-samples", type=POSITIVE, default=64, help="calibration samples collected when --calib is not given"
    )
    p.add_argument("--out", required=True, help="plan folder")
    p.add_argument(
        "--timestep-groups",
        type=POSITIVE,
        default=None,
        help="activation scales per group of timesteps (export writes one graph per group; default: the recipe's, "
        "1 for most)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("plan", help="print which targeting rule hit each layer and the decided format")
    add_model(p)
    add_recipe(p)
    p.add_argument("--plan", default=None, help="show a saved plan instead")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("export", help="export the FP graph and the Q/DQ graph of a plan")
    add_model(p)
    p.add_argument("--plan", required=True, help="plan folder from `diffquant quantize`")
    p.add_argument(
        "--out", required=True, help="folder for the graphs, runtime.json and the conditioning (it must not exist)"
    )
    p.add_argument("--target", default="tensorrt", choices=list(TARGETS), help=TARGET_HELP)
    p.add_argument("--reduce-range", action="store_true", help=REDUCE_RANGE_HELP)
    p.add_argument("--vae-encoder", action="store_true", help="also export the VAE encoder (image-to-image)")
    p.add_argument(
        "--no-parts",
        action="store_true",
        help="export the denoiser only (no text encoders, tokenizers or VAE: the engine folder then draws only the "
        "calibrated prompts and latent models give latents)",
    )
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("recipes", help="list the shipped recipes with their default bits and passes")
    p.set_defaults(fn=cmd_recipes)
