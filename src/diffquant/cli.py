"""The `diffquant` command: one subcommand per stage."""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from diffquant.errors import DiffquantError

__all__ = ["main"]


TARGET_CHOICES = ["tensorrt", "onnxruntime"]


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or any(action.default is v for v in (None, False, argparse.SUPPRESS))
            or action.default in ("", [])
        ):
            return text
        return f"{text} (default: %(default)s)".strip()


def _count(low: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``low`` (a bad value exits 2 with usage, before any work)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: it must be at least {low}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


POSITIVE, NONNEGATIVE = _count(1), _count(0)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="builtin:digits-sd",
        help="builtin:NAME, a diffusers pipeline folder (model_index.json; SD 1.x/2.x, SDXL, PixArt, SD3, Flux, DiT, DDPM), "
        "a bare unet/ or transformer/ folder of an unconditional or class-conditional model, or a hub id (cache only)",
    )
    p.add_argument(
        "--prompts",
        default="",
        metavar="FILE",
        help="calibration prompts, one per line, encoded by the pipeline's own text encoders (default: ~128 shipped prompts)",
    )
    p.add_argument(
        "--resolution",
        default=None,
        type=_resolution,
        metavar="H[xW]",
        help="image size in pixels (default: the pipeline's)",
    )


def _resolution(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected H or HxW in pixels, e.g. 512 or 768x512")
    h = int(parts[0])
    return (h, int(parts[1]) if len(parts) == 2 else h)


def _load(a: argparse.Namespace):
    from diffquant.workflow import RunConfig, load_run_model

    return load_run_model(RunConfig(model=a.model, prompts=a.prompts, resolution=a.resolution))


def _add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe",
        default="minmax",
        help="a shipped recipe's name (list them: `diffquant recipes`) or a recipe file's path ending in .yaml",
    )
    p.add_argument("--bits", default=None, help="wNaK, e.g. w8a8, w4a8, w4a6 (default: the recipe's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PASS.OPTION=VALUE",
        help="override a pass option of the recipe, e.g. --set reconstruct.iters=2000 (repeatable)",
    )


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["reconstruct.iters=2000"]`` -> ``{"reconstruct": {"iters": 2000}}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        pass_name, dot, option = key.partition(".")
        if not eq or not dot or not pass_name or not option:
            raise DiffquantError(f"--set {item!r}: expected PASS.OPTION=VALUE, e.g. reconstruct.iters=2000")
        try:
            out.setdefault(pass_name, {})[option] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise DiffquantError(
                f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote strings, write lists as [1, 2]"
            ) from None
    return out


def _print_summary(report: dict, out: str) -> None:
    from diffquant.eval.report import collapse_note

    q, p = report["quality"], report["parity"]
    collapsed = collapse_note(q)
    print(f"\n{report['model']} ({report['family']['family']}) {report['recipe']} {report['bits']} -> {report['onnx']}")
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
            why = []
            if t["max_step_error"] > p["step_tolerance"]:
                why.append(
                    f"local step error {t['max_step_error']:.3g} > {p['step_tolerance']:g} (a Q/DQ node disagrees with fake-quant)"
                )
            if t["cosine"] < p["cosine_threshold"]:
                cause = (
                    "FP16 rounding" if report.get("target", "tensorrt") == "tensorrt" else "last-bit kernel differences"
                )
                why.append(
                    f"end-to-end cosine {t['cosine']:.6f} < {p['cosine_threshold']:g} (flip rate {t['flip_rate']:.2e}: "
                    + (
                        collapsed
                        if collapsed
                        else f"{cause} moving inputs across rounding boundaries, propagated; see report.md"
                    )
                    + ")"
                )
            print(f"  parity fails at timestep {t['timestep']:g}: " + "; ".join(why))
    if collapsed and p["passed"]:
        print(f"  note: {collapsed}")
    _print_next(report, Path(out))


def _print_next(report: dict, out: Path) -> None:
    """The files a run wrote and the command that comes next."""
    graphs = report.get("graphs") or [report["onnx"]]
    parts = ", text encoders, VAE decoder, tokenizers (parts.json)" if (out / "parts.json").exists() else ""
    print(
        f"wrote {out}/: report.md, report.json, {', '.join(Path(g).name for g in graphs)}, unet.fp32.onnx{parts}, plan/, samples_compare.png"
    )
    if report["parity"]["passed"]:
        cmd = f"diffquant build {out} --out {out / 'engine'}"
        if report.get("target") == "onnxruntime":
            print(
                f"next: {cmd}   (ONNX Runtime on this CPU), then: diffquant generate {out / 'engine'} --prompt ... -n 4"
            )
        else:
            print(
                f"next: {cmd} --backend tensorrt   (on the NVIDIA GPU that serves it; --backend openvino on an Intel CPU)"
            )
    else:
        print(f"next: read {out / 'report.md'} (parity section); the folder is kept so the failure can be inspected")


def cmd_run(a: argparse.Namespace) -> int:
    from diffquant.workflow import RunConfig, run_job

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
    _print_summary(report, a.out)
    return 0 if report["parity"]["passed"] else 1


def cmd_demo(a: argparse.Namespace) -> int:
    out = a.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = [
        "run",
        "--model",
        "builtin:digits-sd",
        "--recipe",
        "minmax",
        "--bits",
        "w8a8",
        "--target",
        "tensorrt",
        "--guidance",
        "3",
        "--calib-samples",
        "32",
        "--samples",
        str(a.samples),
        "--out",
        out,
    ] + (["--quiet"] if a.quiet else [])
    print(
        f"diffquant demo: quantizing builtin:digits-sd to W8A8 (minmax), exporting a TensorRT-ready Q/DQ graph, "
        f"and checking it with ONNX Runtime ({a.samples} samples) -> {out}\n  (the same as: diffquant {' '.join(argv)})"
    )
    return cmd_run(build_parser().parse_args(argv))  # every other option at run's own default


def cmd_calibrate(a: argparse.Namespace) -> int:
    from diffquant.calib_data import CalibConfig, collect

    d = _load(a)
    cs = collect(
        d,
        CalibConfig(samples=a.samples, steps=a.steps, timesteps=a.timesteps, guidance=a.guidance, seed=a.seed),
        cache_dir=a.cache,
        progress=not a.quiet,
    )
    print(f"{len(cs)} calibration inputs at {len(cs.timesteps)} timesteps: {cs.folder}")
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from diffquant._io import atomic_folder
    from diffquant.calib_data import CalibConfig, collect, load_calib
    from diffquant.pipeline import load_recipe, quantize

    d = _load(a)
    recipe = load_recipe(a.recipe, parse_overrides(a.overrides))
    calib = load_calib(a.calib) if a.calib else collect(d, CalibConfig(samples=a.calib_samples), progress=not a.quiet)
    out = Path(a.out)
    if out.exists():
        raise DiffquantError(f"plan folder {out} already exists; pass another --out or delete it")
    plan = quantize(d, recipe, calib, bits=a.bits, timestep_groups=a.timestep_groups, progress=not a.quiet)
    with atomic_folder(out, "plan folder") as tmp:
        plan.save(tmp)
    print(
        f"plan with {len(plan.quantized_layers())} quantized layers ({plan.bits}, {recipe.name}): {out / 'plan.json'}"
    )
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from diffquant.pipeline import decide_targets, load_recipe
    from diffquant.quant import QuantPlan, parse_bits

    d = _load(a)
    if a.plan:
        plan = QuantPlan.load(a.plan)
        rows = [(n, lp.rule, lp.weight, lp.act) for n, lp in plan.layers.items()] + [
            (n, r, None, None) for n, r in plan.skipped.items()
        ]
    else:
        recipe = load_recipe(a.recipe, parse_overrides(a.overrides))
        setting = parse_bits(a.bits or recipe.bits)
        rows = []
        for n, dec in decide_targets(d, recipe).items():
            st = parse_bits(dec.bits) if dec.bits else setting
            rows.append((n, dec.rule, st.weight if dec.weights else None, st.act if dec.activations else None))
    fmt = lambda f, _kind: "FP" if f is None else f.label()  # noqa: E731
    width = max(len(r[0]) for r in rows)
    print(f"{'layer':{width}}  {'weights':18} {'activations':18} rule")
    for name, rule, wf, af in rows:
        print(f"{name:{width}}  {fmt(wf, 1):18} {fmt(af, 1):18} {rule}")
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
    d = _load(a)
    with atomic_folder(a.out, "export folder") as tmp:
        if a.reduce_range:  # the re-quantized plan is what parity is judged against: keep it with the graphs
            plan = reduce_range(plan)
            plan.save(tmp / "plan")
        res = export(plan, d, tmp, target=a.target, parts=PartsConfig(parts=not a.no_parts, vae_encoder=a.vae_encoder))
    graphs = ", ".join(str(Path(a.out) / p.name) for p in res.graphs)
    print(
        f"{graphs} ({a.target}; {res.lint.n_q} Q / {res.lint.n_dq} DQ nodes per graph, linter clean); FP reference {Path(a.out) / res.fp_onnx.name}"
    )
    return 0


def cmd_build(a: argparse.Namespace) -> int:
    from diffquant.engines.bundle import BuildConfig, build
    from diffquant.engines.openvino import OvBuildConfig
    from diffquant.engines.tensorrt import TrtBuildConfig

    shape = dict(batch=a.batch, dynamic=a.dynamic, max_batch=a.max_batch)
    trt = TrtBuildConfig(**shape, opt_level=a.opt_level, timing_cache_dir=a.timing_cache or "")
    ov = OvBuildConfig(**shape, device=a.device, hint=a.hint, threads=a.threads, precision=a.precision)
    out = build(
        a.onnx,
        a.out,
        BuildConfig(backend=a.backend, denoiser=a.denoiser, ort_weights=a.weights, openvino=ov, tensorrt=trt),
    )
    meta = json.loads((out / "engine.json").read_text())
    print(
        f"{meta['backend']} engine folder {out}: {len(meta['engines'])} engine(s) ({', '.join(e['file'] for e in meta['engines'])})"
    )
    if meta.get("parts"):
        parts = ", ".join(
            f"{name} {r['file']} ({r['runner']}, {r['dtype']}{', up-cast from ' + r['upcast_from'] if 'upcast_from' in r else ''})"
            for name, r in meta["parts"].items()
        )
        print(f"  pipeline parts: {parts}" + ("; tokenizers copied" if (out / "tokenizers").is_dir() else ""))
    if "cpu" in meta:
        print(f"  CPU: {meta['cpu']['model']}; flags: {' '.join(meta['cpu']['flags']) or '-'}")
    for e in meta["engines"]:
        if "weights" in e:
            w = e["weights"]
            print(
                f"  {e['file']}: {w['s8']} S8 weights ({w['full_range_s8']} full-range, exact here: this CPU has int32 dot products), {w['u8']} rewritten to U8"
                if w["full_range_s8"]
                else f"  {e['file']}: {w['s8']} S8 weights, {w['u8']} rewritten to U8 (exact on this CPU)"
            )
        if "precision" in e:
            print(
                f"  {e['file']}: OpenVINO {e['openvino']} on {e['device']}, floating-point layers in {e['precision']}"
            )
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    # torch-free on purpose: this path runs on edge devices with only the runtime installed
    from diffquant._io import atomic_path
    from diffquant._png import save_grid_array
    from diffquant.engines.pipeline import PipelineFromFolder, PipelineRequest
    from diffquant.engines.runtime import GenerateConfig
    from diffquant.engines.scheduler import scheduler_kind

    if Path(a.out).is_dir():
        raise DiffquantError(
            f"--out {a.out} is a folder; name the image file to write, e.g. {Path(a.out) / 'samples.png'}"
        )
    settings = GenerateConfig(steps=a.steps, guidance=a.guidance, seed=a.seed, batch=a.batch, scheduler=a.scheduler)
    with PipelineFromFolder(a.engine, threads=a.threads) as pipe:
        req = PipelineRequest(
            _prompts(a, pipe),
            a.n,
            [a.negative_prompt] if a.negative_prompt is not None else None,
            settings,
            a.height,
            a.width,
        )
        t0 = time.time()
        lat = pipe.latents(req, progress=not a.quiet)
        if pipe.runtime.get("latent") and not pipe.decodes:
            import numpy as np

            path = Path(a.out).with_suffix(".npy")
            with atomic_path(path) as tmp:
                np.save(tmp, lat)
            print(
                f"{a.n} latent(s) of {a.prompt!r} from {a.engine} in {time.time() - t0:.1f} s -> {path} "
                f"(this folder has no VAE decoder: exported by an older diffquant; these are the final latents)"
            )
            return 0
        images = pipe.decode(lat)
        digest = next((e.get("plan_model_digest", "") for e in pipe.meta.get("engines", [])), "")
    sampler = pipe.runtime.get("sampler", {})
    text = {
        "prompt": a.prompt,
        "negative_prompt": a.negative_prompt or "",
        "seed": a.seed,
        "steps": a.steps,
        "guidance": a.guidance if a.guidance is not None else sampler.get("default_guidance", 3.0),
        "scheduler": scheduler_kind(pipe.runtime, a.scheduler),
        "engine": str(a.engine),
        "plan_model_digest": digest,
        "software": "diffquant",
    }
    save_grid_array(
        images,
        a.out,
        ncol=min(a.n, 8),
        zoom=max(1, 96 // images.shape[-1]),
        text=text,
        title="" if a.no_caption else _caption(text),
    )
    print(f"{a.n} image(s) of {a.prompt!r} from {a.engine} in {time.time() - t0:.1f} s -> {a.out}")
    return 0


def _caption(text: dict) -> str:
    """Two lines above a `generate` grid: the prompt (and negative prompt), then the settings."""
    cut = lambda t: t if len(t) <= 90 else t[:87] + "..."  # noqa: E731
    first = cut(repr(text["prompt"])) + (
        f"  negative: {cut(repr(text['negative_prompt']))}" if text["negative_prompt"] else ""
    )
    return f"{first}\nseed {text['seed']}, {text['steps']} steps, guidance {text['guidance']}, scheduler {text['scheduler']}"


def _prompts(a: argparse.Namespace, pipe) -> list[str]:
    """The prompts of a `generate` call: free text where the folder has text encoders, else
    exported prompts / class words (several, separated, for the digits models)."""
    if pipe.text is not None:
        if not a.prompt.strip() and pipe.table.null_id > 1:
            raise DiffquantError('--prompt is empty; describe the image, e.g. --prompt "a red cat"')
        return [a.prompt]
    sep = pipe.runtime["conditioning"].get("separator", "")
    if pipe.table.null_id <= 1:  # unconditional: one empty "prompt"
        return [""]
    if not a.prompt.strip():
        raise DiffquantError(
            "--prompt is empty; give one of the exported prompts (class words such as 'seven' for the digits models)"
        )
    return [w for w in a.prompt.split(sep) if w.strip()] if sep else [a.prompt]


def cmd_validate(a: argparse.Namespace) -> int:
    from diffquant.eval.pipeline import PipelineCheckConfig
    from diffquant.eval.validate import ValidateConfig
    from diffquant.workflow import validate_run

    against = [x.strip() for x in a.against.split(",") if x.strip()]
    pipe = PipelineCheckConfig(steps=a.pipeline_steps, **({"prompts": a.pipeline_prompt} if a.pipeline_prompt else {}))
    res = validate_run(
        a.run,
        ValidateConfig(against=against, engine=a.engine or "", timesteps=a.timesteps, samples=a.samples, pipeline=pipe),
    )
    print(res.table())
    print(f"validation {res.verdict}: {a.run}/validate.json, {a.run}/validate.md")
    for name, why in res.not_run.items():
        print(f"{name}: not run ({why}); it was asked for, so the validation does not pass")
    for hint in res.hints():
        print(hint)
    return 0 if res.passed else 1


def cmd_serve(a: argparse.Namespace) -> int:
    # torch-free: the engines, tokenizers and numpy schedulers only
    from diffquant.serve import ServeConfig, serve

    print(f"diffquant serve: loading {a.engine} ...", file=sys.stderr, flush=True)
    serve(
        a.engine,
        a.host,
        a.port,
        ServeConfig(
            queue=a.queue, max_batch=a.max_batch, max_steps=a.max_steps, default_steps=a.steps, threads=a.threads
        ),
    )
    return 0


def cmd_lint(a: argparse.Namespace) -> int:
    from diffquant.exporters import lint, load_onnx

    rep = lint(load_onnx(a.file), a.file, target=a.target)
    for v in rep.violations:
        print(v)
    how = "as asked" if a.target else "the target it was lowered for"
    print(
        f"{a.file}: {rep.n_q} Q / {rep.n_dq} DQ nodes, {len(rep.violations)} violation(s) of the {rep.target} rules ({how})"
    )
    return 0 if rep.ok else 1


def cmd_zoo(a: argparse.Namespace) -> int:
    from diffquant.models.builtin import BUILTIN_MODELS, builtin_card

    if a.action == "list":
        for name in BUILTIN_MODELS:
            try:
                card = builtin_card(name)
                extra = f"final loss {card.get('final_loss', float('nan')):.4f}"
                if "fp_metrics" in card:
                    extra += f", FP FD {card['fp_metrics']['fd']:.3f}, accuracy {card['fp_metrics']['accuracy']:.3f}"
            except DiffquantError:
                extra = "not trained"
            print(f"{name:18} {extra}")
        return 0
    if not a.name:
        raise DiffquantError(f"`diffquant zoo {a.action}` needs a model name: {', '.join(BUILTIN_MODELS)}")
    if a.action == "card":
        print(json.dumps(builtin_card(a.name), indent=2))
        return 0
    from diffquant.zoo import train_and_card

    train_and_card(a.name, steps=a.steps, samples=a.samples)
    return 0


DESCRIPTION = """Quantize diffusion denoisers after training, export deployable Q/DQ graphs, and prove parity.

The stages, each a command (`run` does the first three, then checks parity and quality):
  calibrate -> quantize -> export -> build -> generate / validate

  diffquant run --model builtin:digits-sd --recipe dmq --bits w4a8 --target onnxruntime --out runs/dmq
  diffquant build runs/dmq --out runs/dmq/engine                          # the whole pipeline: text encoders, denoiser, VAE
  diffquant generate runs/dmq/engine --prompt seven -n 16 --out seven.png
  diffquant sensitivity --model builtin:digits-dit --out runs/dit-sens     # Qua2SeDiMo's explainable report

`diffquant COMMAND --help` shows a command's options with their defaults."""


def cmd_recipes(a: argparse.Namespace) -> int:
    from diffquant.pipeline import load_recipe
    from diffquant.pipeline.recipes import available_recipes

    for name in available_recipes():
        r = load_recipe(name)
        groups = f", {r.timestep_groups} timestep groups" if r.timestep_groups > 1 else ""
        print(
            f"{name:14} {r.bits:6} passes: {' -> '.join(n for n, _ in r.passes) or '-'}{groups}\n{'':21}{r.description}"
        )
    return 0


def _csv(kind: type, allowed: tuple = ()):
    """An argparse type: a comma list of ``kind`` values (from ``allowed`` if given)."""

    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {kind.__name__} values") from None
        bad = [v for v in values if allowed and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma list" + (f" of {', '.join(map(str, allowed))}" if allowed else "")
            )
        return values

    parse.__name__ = f"comma list of {kind.__name__}"
    return parse


def cmd_sensitivity(a: argparse.Namespace) -> int:
    from diffquant._io import atomic_folder
    from diffquant.calib_data import CalibConfig, collect
    from diffquant.eval.sensitivity import write_report
    from diffquant.sensitivity_job import SensitivityConfig, analyze

    out = Path(a.out)
    if out.exists():
        raise DiffquantError(f"output folder {out} already exists; pass another --out or delete it")
    if a.holdout >= a.configs - 5:
        raise DiffquantError(
            f"--holdout {a.holdout} leaves fewer than 5 of --configs {a.configs} to train the predictors; lower it"
        )
    cfg = SensitivityConfig(
        configs=a.configs,
        holdout=a.holdout,
        bits=sorted(set(a.bits)),
        methods=a.methods,
        per_step=a.per_step,
        predictors=a.predictors,
        budgets=a.budgets,
        seed=a.seed,
        score=a.score,
        probe_samples=a.probe_samples,
    )
    if len(cfg.bits) < 2 or not all(2 <= b <= 7 for b in cfg.bits):
        raise DiffquantError(f"--bits {a.bits}: give two or more widths within 2..7, e.g. 3,4")
    if not all(2.0 <= b <= 16.0 for b in cfg.budgets):
        raise DiffquantError(f"--budgets {a.budgets}: average weight bits lie within 2..16, e.g. 3.5,3.7,3.9")
    d = _load(a)
    calib = collect(d, CalibConfig(samples=a.calib_samples, timesteps=a.timesteps, seed=a.seed), progress=not a.quiet)
    rep = analyze(d, calib, cfg, progress=not a.quiet)
    with atomic_folder(out, "output folder") as tmp:
        write_report(rep, tmp)
    for f in rep.findings:
        print(f"{'held' if f.held else 'not held' if f.held is not None else 'n/a':>8}: {f.claim} ({f.evidence})")
    best = ", ".join(f"{k} Spearman {v['spearman']:.3f} NDCG@10 {v['ndcg10']:.3f}" for k, v in rep.predictors.items())
    print(
        f"{rep.configs} configurations in {rep.seconds:.0f} s; held-out: {best}\nwrote {out}/sensitivity.md (+ sensitivity.json, 5 PNG plots)"
    )
    return 0


REDUCE_RANGE_HELP = (
    "7-bit weight grids (the plan re-quantized; parity judged against it): S8 weights then run exactly and fast on "
    "x86 CPUs without VNNI, where full 8-bit grids need slower U8 weights"
)


def build_parser() -> argparse.ArgumentParser:
    from diffquant import __version__

    ap = argparse.ArgumentParser(prog="diffquant", description=DESCRIPTION, formatter_class=_Help)
    ap.add_argument("--version", action="version", version=f"diffquant {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the Python traceback of an error instead of one line")
    sub = ap.add_subparsers(
        dest="cmd",
        required=True,
        metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_Help),
    )

    def run_args(p: argparse.ArgumentParser, samples: int) -> None:
        p.add_argument(
            "--target",
            default="tensorrt",
            choices=TARGET_CHOICES,
            help="graph form: tensorrt (FP16, INT8 Q/DQ) or onnxruntime (FP32, fusable U8 Q/DQ)",
        )
        p.add_argument(
            "--timestep-groups",
            type=POSITIVE,
            default=None,
            help="G graphs with per-group activation scales (default: the recipe's, 1 for most)",
        )
        p.add_argument(
            "--samples", type=POSITIVE, default=samples, help="samples for the quality metrics (equal per class)"
        )
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
            help="guidance scale: CFG, or the input of guidance-distilled models (default: the family's; 3 for the digits models)",
        )
        p.add_argument(
            "--calib-samples", type=POSITIVE, default=64, help="calibration samples collected along the FP sampler"
        )
        p.add_argument(
            "--parity-cosine",
            type=float,
            default=0.99,
            help="end-to-end cosine a timestep must reach (noise prediction)",
        )
        p.add_argument("--reduce-range", action="store_true", help=REDUCE_RANGE_HELP)
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("demo", help="run the main job on the builtin model and print where the report is")
    p.add_argument("--out", default=None, help="run folder to create (default: runs/demo-DATE-TIME)")
    p.add_argument("--samples", type=POSITIVE, default=100, help="samples for the quality metrics (equal per class)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("run", help="calibrate, quantize, export, run with ONNX Runtime, check parity and quality")
    _add_model(p)
    _add_recipe(p)
    p.add_argument("--out", required=True, help="run folder to create (it must not exist)")
    run_args(p, 256)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("calibrate", help="collect calibration data along the FP sampler")
    _add_model(p)
    p.add_argument("--samples", type=POSITIVE, default=64, help="calibration samples (sampler trajectories)")
    p.add_argument("--steps", type=POSITIVE, default=25, help="sampler steps of each trajectory")
    p.add_argument("--timesteps", type=POSITIVE, default=25, help="how many evenly spaced sampler steps to keep")
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the family's; 3 for the digits models)"
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of the calibration noise")
    p.add_argument("--cache", default=None, help="cache folder (default ~/.cache/diffquant/calib or $DIFFQUANT_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("quantize", help="decide a QuantPlan")
    _add_model(p)
    _add_recipe(p)
    p.add_argument("--calib", default=None, help="calibration folder from `diffquant calibrate` (default: collect)")
    p.add_argument(
        "--calib-samples", type=POSITIVE, default=64, help="calibration samples collected when --calib is not given"
    )
    p.add_argument("--out", required=True, help="plan folder")
    p.add_argument(
        "--timestep-groups",
        type=POSITIVE,
        default=None,
        help="activation scales per group of timesteps (export writes one graph per group; default: the recipe's, 1 for most)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("plan", help="print which targeting rule hit each layer and the decided format")
    _add_model(p)
    _add_recipe(p)
    p.add_argument("--plan", default=None, help="show a saved plan instead")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("export", help="export the FP graph and the Q/DQ graph of a plan")
    _add_model(p)
    p.add_argument("--plan", required=True, help="plan folder from `diffquant quantize`")
    p.add_argument(
        "--out", required=True, help="folder for the graphs, runtime.json and the conditioning (it must not exist)"
    )
    p.add_argument(
        "--target",
        default="tensorrt",
        choices=TARGET_CHOICES,
        help="graph form: tensorrt (FP16, INT8 Q/DQ) or onnxruntime (FP32, fusable U8 Q/DQ)",
    )
    p.add_argument("--reduce-range", action="store_true", help=REDUCE_RANGE_HELP)
    p.add_argument("--vae-encoder", action="store_true", help="also export the VAE encoder (image-to-image)")
    p.add_argument(
        "--no-parts",
        action="store_true",
        help="export the denoiser only (no text encoders, tokenizers or VAE: the engine folder then "
        "draws only the calibrated prompts and latent models give latents)",
    )
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser(
        "build",
        help="build an engine folder (the whole pipeline) from a run or export folder (ONNX Runtime, OpenVINO or TensorRT)",
        description="Build on the machine that will run the engine: it records that machine (GPU, or CPU model and ISA flags) "
        "and makes the integer weights exact for it. The folder gets the denoiser engine(s), the text encoders, "
        "the VAE decoder and the tokenizers, every file hashed in engine.json.",
    )
    p.add_argument("onnx", help="run / export folder, or its unet.qdq.onnx (timestep-group siblings are built too)")
    p.add_argument(
        "--denoiser",
        default="qdq",
        choices=["qdq", "fp"],
        help="qdq: the quantized denoiser; fp: the FP32 reference graph (an all-FP pipeline, for parity)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "onnxruntime", "openvino", "tensorrt"],
        help="auto: the backend the graph was lowered for (--target of run/export: tensorrt or onnxruntime); "
        "onnxruntime: the onnxruntime-target graph on CPU; openvino: Intel CPUs/GPUs/NPUs, fastest from the tensorrt-target "
        "graph; tensorrt: NVIDIA GPUs",
    )
    p.add_argument("--out", required=True, help="engine folder to create")
    p.add_argument("--batch", type=POSITIVE, default=2, help="profile batch (2 = one image with CFG)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch 1..--max-batch (TensorRT, OpenVINO)")
    p.add_argument("--max-batch", type=POSITIVE, default=32, help="largest batch of a --dynamic profile")
    p.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "s8", "u8"],
        help="ONNX Runtime weights: auto keeps S8 (fast U8S8 kernels) and rewrites to U8 (exact, slower) only the full-range "
        "weights this CPU would saturate (x86 without VNNI); s8 refuses such a CPU instead; u8 rewrites all",
    )
    p.add_argument(
        "--threads", type=NONNEGATIVE, default=0, help="CPU threads (OpenVINO; default: the runtime's choice)"
    )
    p.add_argument(
        "--precision",
        default="",
        choices=["", "f32", "bf16", "f16"],
        help="OpenVINO precision of the layers left in floating point (default: the plugin's, bf16 where the CPU has it)",
    )
    p.add_argument("--hint", default="LATENCY", choices=["LATENCY", "THROUGHPUT"], help="OpenVINO performance hint")
    p.add_argument("--device", default="CPU", help="OpenVINO device: CPU (tested), GPU, NPU")
    p.add_argument(
        "--opt-level",
        type=int,
        default=4,
        choices=range(6),
        metavar="0-5",
        help="TensorRT builder optimization level (0-5)",
    )
    p.add_argument("--timing-cache", default=None, help="timing cache folder (default ~/.cache/diffquant/trt_timing)")
    p.set_defaults(fn=cmd_build)

    p = sub.add_parser(
        "generate",
        help="sample images with an engine folder: tokenize, encode, denoise, decode (numpy schedulers; no torch needed)",
        description="Runs the whole pipeline from the engine folder: the tokenizers and text encoders turn --prompt and "
        "--negative-prompt into conditioning, the denoiser engines sample with the pipeline's scheduler (numpy), "
        "the VAE decoder makes the images. Writes one PNG grid, captioned with the prompt, seed and settings, which are also in its text chunks.",
    )
    p.add_argument("engine", help="engine folder from `diffquant build`")
    p.add_argument(
        "--prompt",
        default="",
        help="what to draw (text-to-image models: any text; digits models: class word(s), e.g. seven or "
        "zero,one,two); unconditional models need none",
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="what to steer away from (CFG models; default: the pipeline's: the empty prompt, or zeros for SDXL)",
    )
    p.add_argument("-n", type=POSITIVE, default=16, help="number of images")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--steps", type=POSITIVE, default=25, help="sampler steps")
    p.add_argument(
        "--scheduler",
        default="auto",
        choices=["auto", "ddim", "euler", "dpm++", "flow"],
        help="auto: the pipeline's own (DDIM, Euler, DPM-Solver++ or flow Euler; other types sample with DDIM on their schedule)",
    )
    p.add_argument(
        "--height",
        type=POSITIVE,
        default=None,
        help="image height in pixels (must be the engine's: its graphs have a static size)",
    )
    p.add_argument("--width", type=POSITIVE, default=None, help="image width in pixels (must be the engine's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of every sampled noise (same seed: byte-identical outputs)"
    )
    p.add_argument("--batch", type=POSITIVE, default=16, help="images per engine call")
    p.add_argument(
        "--threads",
        type=NONNEGATIVE,
        default=0,
        help="CPU threads (ONNX Runtime, OpenVINO; default: the runtime's choice)",
    )
    p.add_argument(
        "--no-caption",
        action="store_true",
        help="no prompt / settings caption above the grid (they stay in the PNG's text chunks)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "serve",
        help="serve an engine folder over HTTP: POST /generate {prompt, ...} -> PNG (needs the [serve] extra)",
        description="One process, one worker owning the engines: requests wait in a bounded queue (503 when full) and "
        "queued requests with the same settings run as one batch. Example: curl -X POST localhost:8000/generate "
        '-H \'content-type: application/json\' -d \'{"prompt": "a red cat", "seed": 1}\' -o cat.png',
    )
    p.add_argument("engine", help="engine folder from `diffquant build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=NONNEGATIVE, default=8000, help="TCP port (0: a free one, printed when listening)")
    p.add_argument("--queue", type=POSITIVE, default=16, help="requests that may wait; more get 503")
    p.add_argument(
        "--max-batch", type=POSITIVE, default=4, help="images per engine run (queued requests with the same settings)"
    )
    p.add_argument("--steps", type=POSITIVE, default=20, help="sampler steps when a request names none")
    p.add_argument("--max-steps", type=POSITIVE, default=100, help="the most steps a request may ask for")
    p.add_argument(
        "--threads",
        type=NONNEGATIVE,
        default=0,
        help="CPU threads (ONNX Runtime, OpenVINO; default: the runtime's choice)",
    )
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser(
        "validate",
        help="Polygraphy parity report of a run: fake-quant vs ORT Q/DQ, FP torch vs FP ONNX, ORT vs TensorRT",
    )
    p.add_argument("run", help="run folder from `diffquant run`")
    p.add_argument(
        "--against",
        default="fake-quant,fp",
        help="comparisons: fake-quant, fp, fused, openvino, tensorrt, pipeline (whole images "
        "from engine folders vs the diffusers FP pipeline: FP engines must reach 40 dB PSNR)",
    )
    p.add_argument(
        "--engine",
        default=None,
        help="engine folder for the openvino / tensorrt comparison (default: build one in the run folder)",
    )
    p.add_argument("--timesteps", type=POSITIVE, default=6, help="timesteps compared")
    p.add_argument("--samples", type=POSITIVE, default=8, help="recorded inputs per timestep")
    p.add_argument(
        "--pipeline-prompt",
        action="append",
        default=None,
        help="a prompt of the pipeline comparison (repeat for more; default: two built-in prompts)",
    )
    p.add_argument("--pipeline-steps", type=POSITIVE, default=20, help="sampler steps of the pipeline comparison")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("lint", help="check an ONNX graph against the TensorRT (or ONNX Runtime) Q/DQ rules")
    p.add_argument("file", help="an ONNX graph (unet.qdq.onnx from `run` / `export`)")
    p.add_argument(
        "--target",
        default=None,
        choices=TARGET_CHOICES,
        help="rules to apply (default: the target the graph was lowered for)",
    )
    p.set_defaults(fn=cmd_lint)

    p = sub.add_parser("zoo", help="builtin models: list, card, train")
    p.add_argument(
        "action", choices=["list", "card", "train"], help="list the builtin models, print one's card, or train one"
    )
    p.add_argument("name", nargs="?", help="builtin model name (card, train)")
    p.add_argument("--steps", type=POSITIVE, default=None, help="training steps (default: the model's)")
    p.add_argument("--samples", type=POSITIVE, default=1000, help="samples for the card's FP metrics")
    p.set_defaults(fn=cmd_zoo)

    p = sub.add_parser(
        "sensitivity",
        help="Qua2SeDiMo sensitivity report: per layer, op type and block, predictors, budgeted searches, findings",
        description="Score random weight configurations (every conv / linear at one option: UAQ or k-means, at each bit width) "
        "against the FP model, fit predictors of the score, read each layer's importance off them, and search "
        "assignments for average-bit budgets. Writes sensitivity.md, sensitivity.json and PNG plots.",
    )
    _add_model(p)
    p.add_argument("--out", required=True, help="report folder to create")
    p.add_argument(
        "--configs", type=_count(20), default=200, help="random configurations scored (M; the paper uses ~500)"
    )
    p.add_argument(
        "--holdout", type=POSITIVE, default=50, help="of them, held out to measure the predictors' rank correlation"
    )
    p.add_argument("--bits", type=_csv(int), default=[3, 4], help="weight bit widths of the options")
    p.add_argument(
        "--methods",
        type=_csv(str, ("uaq", "kmeans-c", "kmeans-a")),
        default=["uaq", "kmeans-c", "kmeans-a"],
        help="quantizer methods of the options",
    )
    p.add_argument(
        "--predictors",
        type=_csv(str, ("ridge", "gnn")),
        default=["ridge", "gnn"],
        help="predictors fitted and compared (the best gives the importance)",
    )
    p.add_argument(
        "--budgets",
        type=_csv(float),
        default=[3.5, 3.7, 3.9],
        help="average weight bits (overhead counted) to search for",
    )
    p.add_argument(
        "--score",
        choices=("noise", "samples"),
        default="noise",
        help="noise: noise-prediction SNR on recorded inputs (one pass per timestep); samples: PSNR of whole samples vs FP "
        "(sees error accumulate along the trajectory; one sampling run per configuration)",
    )
    p.add_argument(
        "--probe-samples",
        type=POSITIVE,
        default=20,
        help="samples per configuration with --score samples (calibration seeds)",
    )
    p.add_argument(
        "--per-step", type=POSITIVE, default=4, help="recorded inputs per calibration timestep in each noise score"
    )
    p.add_argument(
        "--calib-samples", type=POSITIVE, default=16, help="calibration samples collected along the FP sampler"
    )
    p.add_argument("--timesteps", type=POSITIVE, default=10, help="calibration timesteps kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the configurations, the calibration noise and the GNN")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_sensitivity)

    p = sub.add_parser("recipes", help="list the shipped recipes with their default bits and passes")
    p.set_defaults(fn=cmd_recipes)
    for p in sub.choices.values():
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the Python traceback of an error instead of one line",
        )
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every temp folder is cleaned up on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.fn(args)
    except DiffquantError as e:
        if args.debug:
            raise
        print(f"diffquant: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("diffquant: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("diffquant: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line, the traceback with --debug
        if args.debug:
            raise
        print(
            f"diffquant: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
