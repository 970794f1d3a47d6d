"""Commands that check and explain: `validate` (a run's graphs against their references),
`sensitivity` (Qua2SeDiMo's report), `zoo` (the builtin models)."""

from __future__ import annotations

import argparse
import json

from diffquant.cli._args import POSITIVE, add_model, count, csv
from diffquant.errors import DiffquantError

__all__ = ["add_parsers"]


def cmd_validate(a: argparse.Namespace) -> int:
    from diffquant.eval.pipeline_parity import PipelineCheckConfig
    from diffquant.eval.validate import ValidateConfig
    from diffquant.jobs.validate import validate_run

    against = [x.strip() for x in a.against.split(",") if x.strip()]
    pipe = PipelineCheckConfig(steps=a.pipeline_steps, **({"prompts": a.pipeline_prompt} if a.pipeline_prompt else {}))
    cfg = ValidateConfig(
        against=against, engine=a.engine or "", timesteps=a.timesteps, samples=a.samples, pipeline=pipe
    )
    res = validate_run(a.run, cfg)
    print(res.table())
    print(f"validation {res.verdict}: {a.run}/validate.json, {a.run}/validate.md")
    for name, why in res.not_run.items():
        print(f"{name}: not run ({why}); it was asked for, so the validation does not pass")
    for hint in res.hints():
        print(hint)
    return 0 if res.passed else 1


def cmd_sensitivity(a: argparse.Namespace) -> int:
    from diffquant.jobs.sensitivity import SensitivityJob, sensitivity_job
    from diffquant.passes.qua2sedimo.analyze import SensitivityConfig

    analysis = SensitivityConfig(
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
    job = SensitivityJob(
        out=a.out,
        model=a.model,
        prompts=a.prompts,
        resolution=a.resolution,
        calib_samples=a.calib_samples,
        timesteps=a.timesteps,
        analysis=analysis,
        progress=not a.quiet,
    )
    rep, files = sensitivity_job(job)
    for f in rep.findings:
        print(f"{'held' if f.held else 'not held' if f.held is not None else 'n/a':>8}: {f.claim} ({f.evidence})")
    best = ", ".join(f"{k} Spearman {v['spearman']:.3f} NDCG@10 {v['ndcg10']:.3f}" for k, v in rep.predictors.items())
    plots = sum(1 for f in files if f.suffix == ".png")
    print(f"{rep.configs} configurations in {rep.seconds:.0f} s; held-out: {best}")
    print(f"wrote {files[0]} (+ sensitivity.json, {plots} PNG plots)")
    return 0


def cmd_zoo(a: argparse.Namespace) -> int:
    from diffquant.zoo.builtin import BUILTIN_MODELS, builtin_card

    if a.action == "list":
        for name in BUILTIN_MODELS:
            try:
                card = builtin_card(name)
                extra = f"final loss {card.get('final_loss', float('nan')):.4f}"
                if "fp_metrics" in card:
                    m = card["fp_metrics"]
                    extra += f", FP FD {m['fd']:.3f}, accuracy {m['accuracy']:.3f}"
            except DiffquantError:
                extra = "not trained"
            print(f"{name:18} {extra}")
        return 0
    if not a.name:
        raise DiffquantError(f"`diffquant zoo {a.action}` needs a model name: {', '.join(BUILTIN_MODELS)}")
    if a.action == "card":
        print(json.dumps(builtin_card(a.name), indent=2))
        return 0
    from diffquant.jobs.zoo import train_and_card

    train_and_card(a.name, steps=a.steps, samples=a.samples)
    return 0


def _add_validate(sub: argparse._SubParsersAction) -> None:
    from diffquant.engines.backends import BACKENDS

    engines = [b.name for b in BACKENDS.values() if b.validate]
    p = sub.add_parser(
        "validate",
        help="Polygraphy parity report of a run: fake-quant vs ORT Q/DQ, FP torch vs FP ONNX, ORT vs TensorRT",
    )
    p.add_argument("run", help="run folder from `diffquant run`")
    p.add_argument(
        "--against",
        default="fake-quant,fp",
        help=f"comparisons: fake-quant, fp, fused, {', '.join(engines)}, pipeline (whole images "
        "from engine folders vs the diffusers FP pipeline: FP engines must reach 40 dB PSNR)",
    )
    p.add_argument(
        "--engine",
        default=None,
        help=f"engine folder for the {' / '.join(engines)} comparison (default: build one in the run folder)",
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


def _add_sensitivity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity",
        help="Qua2SeDiMo sensitivity report: per layer, op type and block, predictors, budgeted searches, findings",
        description="Score random weight configurations (every conv / linear at one option: UAQ or k-means, at each "
        "bit width) against the FP model, fit predictors of the score, read each layer's importance off them, and "
        "search assignments for average-bit budgets. Writes sensitivity.md, sensitivity.json and PNG plots.",
    )
    add_model(p)
    p.add_argument("--out", required=True, help="report folder to create")
    p.add_argument(
        "--configs", type=count(20), default=200, help="random configurations scored (M; the paper uses ~500)"
    )
    p.add_argument(
        "--holdout", type=POSITIVE, default=50, help="of them, held out to measure the predictors' rank correlation"
    )
    p.add_argument("--bits", type=csv(int), default=[3, 4], help="weight bit widths of the options")
    methods = ("uaq", "kmeans-c", "kmeans-a")
    p.add_argument("--methods", type=csv(str, methods), default=list(methods), help="quantizer methods of the options")
    p.add_argument(
        "--predictors",
        type=csv(str, ("ridge", "gnn")),
        default=["ridge", "gnn"],
        help="predictors fitted and compared (the best gives the importance)",
    )
    p.add_argument(
        "--budgets",
        type=csv(float),
        default=[3.5, 3.7, 3.9],
        help="average weight bits (overhead counted) to search for",
    )
    p.add_argument(
        "--score",
        choices=("noise", "samples"),
        default="noise",
        help="noise: noise-prediction SNR on recorded inputs (one pass per timestep); samples: PSNR of whole samples "
        "vs FP (sees error accumulate along the trajectory; one sampling run per configuration)",
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_validate(sub)
    _add_sensitivity(sub)
    p = sub.add_parser("zoo", help="builtin models: list, card, train")
    p.add_argument(
        "action", choices=["list", "card", "train"], help="list the builtin models, print one's card, or train one"
    )
    p.add_argument("name", nargs="?", help="builtin model name (card, train)")
    p.add_argument("--steps", type=POSITIVE, default=None, help="training steps (default: the model's)")
    p.add_argument("--samples", type=POSITIVE, default=1000, help="samples for the card's FP metrics")
    p.set_defaults(fn=cmd_zoo)
