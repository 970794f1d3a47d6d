"""Commands that build and run what was exported: `build`, `generate`, `serve`, `lint`.
Torch-free: these run on edge devices with only the runtime installed."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffquant.cli._args import NONNEGATIVE, POSITIVE, add_config_arguments
from diffquant.engines.backends import BACKENDS
from diffquant.engines.base import BatchProfile
from diffquant.errors import DiffquantError
from diffquant.targets import TARGETS

__all__ = ["add_parsers"]


def cmd_build(a: argparse.Namespace) -> int:
    from diffquant.artifacts import EngineManifest
    from diffquant.engines.build import BuildConfig, build

    options = {name: getattr(a, name) for name in a.build_options}
    out = build(a.onnx, a.out, BuildConfig(backend=a.backend, denoiser=a.denoiser, options=options))
    meta = EngineManifest.read(out, BACKENDS)
    files = ", ".join(e.file for e in meta.engines)
    print(f"{meta.backend} engine folder {out}: {len(meta.engines)} engine(s) ({files})")
    if meta.parts:
        parts = ", ".join(
            f"{name} {r.file} ({r.runner}, {r.dtype}"
            + (f", up-cast from {r.details['upcast_from']}" if "upcast_from" in r.details else "")
            + ")"
            for name, r in meta.parts.items()
        )
        print(f"  pipeline parts: {parts}" + ("; tokenizers copied" if (out / "tokenizers").is_dir() else ""))
    if meta.cpu:
        print(f"  CPU: {meta.cpu['model']}; flags: {' '.join(meta.cpu['flags']) or '-'}")
    for e in meta.engines:
        line = BACKENDS[meta.backend].describe(e.details)
        if line:
            print(f"  {e.file}: {line}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    # torch-free on purpose: this path runs on edge devices with only the runtime installed
    from diffquant._io import atomic_path
    from diffquant._png import save_grid_array
    from diffquant.engines.deployed import PipelineFromFolder, PipelineRequest
    from diffquant.engines.runtime import GenerateConfig
    from diffquant.engines.scheduler import scheduler_kind

    if Path(a.out).is_dir():
        raise DiffquantError(
            f"--out {a.out} is a folder; name the image file to write, e.g. {Path(a.out) / 'samples.png'}"
        )
    settings = GenerateConfig(steps=a.steps, guidance=a.guidance, seed=a.seed, batch=a.batch, scheduler=a.scheduler)
    with PipelineFromFolder(a.engine, threads=a.threads) as pipe:
        negative = [a.negative_prompt] if a.negative_prompt is not None else None
        req = PipelineRequest(_prompts(a, pipe), a.n, negative, settings, a.height, a.width)
        t0 = time.time()
        lat = pipe.latents(req, progress=not a.quiet)
        if pipe.runtime.latent and not pipe.decodes:
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
    sampler = pipe.runtime.sampler
    text = {
        "prompt": a.prompt,
        "negative_prompt": a.negative_prompt or "",
        "seed": a.seed,
        "steps": a.steps,
        "guidance": a.guidance if a.guidance is not None else sampler.default_guidance,
        "scheduler": scheduler_kind(sampler, pipe.runtime.scheduler, a.scheduler),
        "engine": str(a.engine),
        "plan_model_digest": pipe.meta.plan_model_digest,
        "software": "diffquant",
    }
    title = "" if a.no_caption else _caption(text)
    save_grid_array(images, a.out, ncol=min(a.n, 8), zoom=max(1, 96 // images.shape[-1]), text=text, title=title)
    print(f"{a.n} image(s) of {a.prompt!r} from {a.engine} in {time.time() - t0:.1f} s -> {a.out}")
    return 0


def _caption(text: dict) -> str:
    """Two lines above a `generate` grid: the prompt (and negative prompt), then the settings."""

    def cut(t: str) -> str:
        return t if len(t) <= 90 else t[:87] + "..."

    first = cut(repr(text["prompt"]))
    if text["negative_prompt"]:
        first += f"  negative: {cut(repr(text['negative_prompt']))}"
    settings = f"seed {text['seed']}, {text['steps']} steps, guidance {text['guidance']}, scheduler {text['scheduler']}"
    return f"{first}\n{settings}"


def _prompts(a: argparse.Namespace, pipe) -> list[str]:
    """The prompts of a `generate` call: free text where the folder has text encoders, else
    exported prompts / class words (several, separated, for the digits models)."""
    if pipe.text is not None:
        if not a.prompt.strip() and pipe.table.null_id > 1:
            raise DiffquantError('--prompt is empty; describe the image, e.g. --prompt "a red cat"')
        return [a.prompt]
    sep = pipe.runtime.conditioning.separator
    if pipe.table.null_id <= 1:  # unconditional: one empty "prompt"
        return [""]
    if not a.prompt.strip():
        raise DiffquantError(
            "--prompt is empty; give one of the exported prompts (class words such as 'seven' for the digits models)"
        )
    return [w for w in a.prompt.split(sep) if w.strip()] if sep else [a.prompt]


def cmd_serve(a: argparse.Namespace) -> int:
    # torch-free: the engines, tokenizers and numpy schedulers only
    from diffquant.serve import ServeConfig, serve

    print(f"diffquant serve: loading {a.engine} ...", file=sys.stderr, flush=True)
    cfg = ServeConfig(
        queue=a.queue, max_batch=a.max_batch, max_steps=a.max_steps, default_steps=a.steps, threads=a.threads
    )
    serve(a.engine, a.host, a.port, cfg)
    return 0


def cmd_lint(a: argparse.Namespace) -> int:
    from diffquant.exporters import lint, load_onnx

    rep = lint(load_onnx(a.file), a.file, target=a.target)
    for v in rep.violations:
        print(v)
    how = "as asked" if a.target else "the target it was lowered for"
    n = len(rep.violations)
    print(f"{a.file}: {rep.n_q} Q / {rep.n_dq} DQ nodes, {n} violation(s) of the {rep.target} rules ({how})")
    return 0 if rep.ok else 1


BUILD_DESCRIPTION = (
    "Build on the machine that will run the engine: it records that machine (GPU, or CPU model and ISA flags) "
    "and makes the integer weights exact for it. The folder gets the denoiser engine(s), the text encoders, "
    "the VAE decoder and the tokenizers, every file hashed in engine.json.\n\nbackends:\n"
    + "\n".join(f"  {b.name:12} {b.summary}" for b in BACKENDS.values())
)


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build an engine folder (the whole pipeline) from a run or export folder (" + ", ".join(BACKENDS) + ")",
        description=BUILD_DESCRIPTION,
    )
    p.add_argument("onnx", help="run / export folder, or its unet.qdq.onnx (timestep-group siblings are built too)")
    p.add_argument(
        "--denoiser",
        default="qdq",
        choices=["qdq", "fp"],
        help="qdq: the quantized denoiser; fp: the FP32 reference graph (an all-FP pipeline, for parity)",
    )
    auto = ", ".join(f"{t.backend} for the {t.name} target" for t in TARGETS.values())
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *BACKENDS],
        help=f"auto: the backend the graph was lowered for (--target of run/export: {auto})",
    )
    p.add_argument("--out", required=True, help="engine folder to create")
    seen: set[str] = set()
    add_config_arguments(p.add_argument_group("build profile (backends with one)"), BatchProfile, seen)
    for b in BACKENDS.values():
        add_config_arguments(p.add_argument_group(f"{b.name} options"), b.settings, seen)
    p.set_defaults(fn=cmd_build, build_options=sorted(seen))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for add in (_add_build, _add_generate, _add_serve, _add_lint):
        add(sub)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample images with an engine folder: tokenize, encode, denoise, decode (numpy schedulers; "
        "no torch needed)",
        description="Runs the whole pipeline from the engine folder: the tokenizers and text encoders turn --prompt "
        "and "
        "--negative-prompt into conditioning, the denoiser engines sample with the pipeline's scheduler (numpy), "
        "the VAE decoder makes the images. Writes one PNG grid, captioned with the prompt, seed and settings, which "
        "are also in its text chunks.",
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
        help="auto: the pipeline's own (DDIM, Euler, DPM-Solver++ or flow Euler; other types sample with DDIM on "
        "their schedule)",
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


def _add_serve(sub: argparse._SubParsersAction) -> None:
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


def _add_lint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lint", help="check an ONNX graph against a target's Q/DQ rules (TensorRT's by default)")
    p.add_argument("file", help="an ONNX graph (unet.qdq.onnx from `run` / `export`)")
    p.add_argument(
        "--target",
        default=None,
        choices=list(TARGETS),
        help="rules to apply (default: the target the graph was lowered for)",
    )
    p.set_defaults(fn=cmd_lint)
