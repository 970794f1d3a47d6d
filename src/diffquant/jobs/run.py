"""The `run` job: calibrate -> quantize -> export -> ONNX Runtime -> parity and quality -> report.

Everything is written into a hidden temp folder beside ``out`` and renamed onto ``out`` only when
the whole job succeeded, so a failed run leaves nothing half-written. The job names no paper:
the passes the recipe ran add their own report files through their report hooks.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from diffquant._io import atomic_folder
from diffquant.artifacts import RunReport
from diffquant.calib_data import CalibConfig, CalibSet, collect
from diffquant.calib_data.collect import pick_inputs
from diffquant.engines import Engine, GroupedEngine, OrtEngine
from diffquant.engines.cpu import cpu_info
from diffquant.engines.ort import FusedEngineFromOnnx
from diffquant.errors import DiffquantError
from diffquant.eval import (
    ParityResult,
    check_parity,
    merge_parity,
    noise_fidelity,
    save_grid,
    score_fidelity,
    score_samples,
    write_markdown,
)
from diffquant.exporters import ExportResult, export
from diffquant.models.denoiser import Denoiser
from diffquant.models.inputs import NamedInputs
from diffquant.models.loading import LoadConfig, load_classifier, load_denoiser, read_prompts
from diffquant.models.sampler import SamplerConfig, prompt_batch, sample
from diffquant.passes import Recipe, load_recipe, quantize
from diffquant.passes.registry import write_pass_reports
from diffquant.quant import QuantPlan, fake_quant_forms, reduce_range
from diffquant.quant.format import parse_bits
from diffquant.targets import get_target
from diffquant.zoo.data import load_digits_tensor

__all__ = ["RunConfig", "engine_eps_fn", "load_run_model", "run_job", "torch_eps_fn"]


@dataclass
class RunConfig:
    """Settings of one `diffquant run` (defaults: the quality protocol of docs/ARCHITECTURE.md at N = 256).
    ``prompts``: a prompts file for text-to-image pipelines (default: the shipped list);
    ``resolution``: image size in pixels (default: the pipeline's); ``guidance``: None takes
    the family's default (3 for the digits models)."""

    model: str = "builtin:digits-sd"
    prompts: str = ""
    resolution: tuple[int, int] | None = None
    recipe: str = "minmax"
    bits: str | None = None
    target: str = "tensorrt"
    reduce_range: bool = False  # 7-bit weight grids (S8 weights exact on CPUs without VNNI)
    timestep_groups: int | None = None
    out: str = "runs/sd-w8a8"
    samples: int = 256
    steps: int = 25
    guidance: float | None = None
    seed: int = 0
    calib_samples: int = 64
    calib_timesteps: int = 25
    parity_samples: int = 8
    parity_timesteps: int = 4
    parity_cosine: float = 0.99
    batch_size: int = 128
    progress: bool = True
    overrides: dict = field(default_factory=dict)  # pass name -> option values replacing the recipe's


def engine_eps_fn(engine: Engine, batch: int = 256, output: str = "noise_pred"):
    """Wrap an engine as a torch noise-prediction function of named inputs for the sampler."""

    def eps(inputs: NamedInputs) -> torch.Tensor:
        outs = [
            engine.run(inputs.take(slice(i, i + batch)).numpy())[output].astype(np.float32)
            for i in range(0, inputs.size, batch)
        ]
        return torch.from_numpy(np.concatenate(outs))

    return eps


def torch_eps_fn(model: Denoiser):
    """A torch denoiser (FP or fake-quant) as a noise-prediction function of named inputs."""
    return lambda inputs: model(**inputs)


def _fp_ladder(denoiser: Denoiser, path: Path, inputs) -> float:
    """Ladder step 1: relative max error of ORT on the FP32 ONNX vs torch FP."""
    worst = 0.0
    with OrtEngine(path) as eng, torch.no_grad():
        for _, named in inputs:
            ref = denoiser(**named).numpy()
            got = eng.run(named.numpy())[denoiser.output_names[0]]
            worst = max(worst, float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)))
    return worst


def load_run_model(cfg: RunConfig) -> Denoiser:
    """The run's denoiser, read with its prompts and resolution."""
    prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    return load_denoiser(
        cfg.model, LoadConfig(prompts=prompts, resolution=tuple(cfg.resolution) if cfg.resolution else None)
    )


def run_job(cfg: RunConfig) -> RunReport:
    """Run the whole job; returns the report (also written to ``out/report.json``)."""
    out = Path(cfg.out)
    if out.exists():
        raise DiffquantError(f"output folder {out} already exists; pass another --out or delete it")
    recipe = load_recipe(cfg.recipe, cfg.overrides)
    bits = parse_bits(cfg.bits or recipe.bits).text
    get_target(cfg.target)
    if cfg.samples < 1 or cfg.steps < 1:
        raise DiffquantError(f"--samples and --steps must be at least 1, got {cfg.samples} and {cfg.steps}")
    denoiser = load_run_model(cfg)
    if cfg.model.startswith("builtin:") and cfg.samples < 10:
        raise DiffquantError(f"--samples must be at least 10 (one per class), got {cfg.samples}")
    n = denoiser.null_id
    if n > 1 and cfg.samples % n:
        print(
            f"diffquant: warning: --samples {cfg.samples} is not a multiple of the {n} prompts, so they get unequal "
            f"counts; use a multiple (e.g. {cfg.samples - cfg.samples % n or n}) for comparable FD",
            file=sys.stderr,
        )
    if cfg.guidance is None:
        cfg = copy.copy(cfg)
        cfg.guidance = denoiser.family.default_guidance
    with atomic_folder(out) as tmp:
        report = _run(cfg, denoiser, recipe, bits, tmp, out)
    return report


def _stage(cfg: RunConfig, i: int, what: str) -> None:
    if cfg.progress:
        print(f"[{i}/5] {what}", file=sys.stderr, flush=True)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.time()
    yield
    timings[key] = time.time() - t0


def _run(cfg: RunConfig, denoiser: Denoiser, recipe: Recipe, bits: str, tmp: Path, out: Path) -> RunReport:
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    with _timed(timings, "calibrate_s"):
        _stage(cfg, 1, "calibrate: the FP sampler's inputs")
        ccfg = CalibConfig(
            samples=cfg.calib_samples, steps=cfg.steps, timesteps=cfg.calib_timesteps, guidance=cfg.guidance
        )
        calib = collect(denoiser, ccfg, progress=cfg.progress)
    with _timed(timings, "quantize_s"):
        _stage(cfg, 2, f"quantize: recipe {recipe.name}, {bits}")
        plan = quantize(denoiser, recipe, calib, bits=bits, progress=cfg.progress, timestep_groups=cfg.timestep_groups)
        plan = reduce_range(plan) if cfg.reduce_range else plan
        plan.save(tmp / "plan")
    pass_files = write_pass_reports(plan, tmp)
    with _timed(timings, "export_s"):
        _stage(cfg, 3, f"export: the {cfg.target}-target Q/DQ graph, linted")
        exp = export(plan, denoiser, tmp, target=cfg.target)
    with _timed(timings, "parity_s"):
        _stage(cfg, 4, "parity: the graph vs the fake-quant model, node by node")
        fq, parity, ladder, inputs = _parity(cfg, denoiser, plan, calib, exp)
    with _timed(timings, "evaluate_s"):
        _stage(cfg, 5, f"evaluate: {cfg.samples} samples each from FP, fake-quant and the deployed graph")
        quality, noise, samples = _evaluate(cfg, denoiser, fq, exp, inputs)
    _grids(denoiser, samples, tmp)
    report = RunReport(
        model=cfg.model,
        family=denoiser.family.describe(),
        recipe=recipe.name,
        bits=bits,
        target=cfg.target,
        reduce_range=cfg.reduce_range,
        cpu=cpu_info().to_dict(),
        onnx=str(out / exp.qdq_onnx.name),
        graphs=[str(out / p.name) for p in exp.graphs],
        timestep_groups=exp.timestep_groups,
        deployed_qdq_fusion=get_target(cfg.target).fused_kernels,
        fp_onnx=str(out / exp.fp_onnx.name),
        plan=str(out / "plan"),
        parity=parity.to_dict(),
        ladder={"fp32_onnx_rel_max_error": ladder},
        quality=quality,
        noise_fidelity=noise,
        timings=timings,
        settings={**asdict(cfg), "resolution": list(denoiser.family.resolution)},
        realized=exp.realized,
        skipped=plan.skipped,
        plan_bits=plan.bits.to_dict(),
        pass_reports=[r.to_dict() for r in plan.reports],
        lint={"violations": len(exp.lint.violations), "q_nodes": exp.lint.n_q, "dq_nodes": exp.lint.n_dq},
        pass_files=[f.name for f in pass_files],
    )
    report.write(tmp)
    write_markdown(report, tmp / "report.md")
    return report


def _parity(
    cfg: RunConfig, denoiser: Denoiser, plan: QuantPlan, calib: CalibSet, exp: ExportResult
) -> tuple[Denoiser, ParityResult, float, list]:
    """Every graph against the fake-quant model of what it computes (the deployed form), on
    recorded inputs of its timestep group, and the FP32 graph against torch (ladder step 1).
    Returns the research form (for the fake-quant samples), parity, the ladder and the inputs."""
    fq, fq_graph = fake_quant_forms(denoiser, plan, cfg.target)
    inputs = pick_inputs(calib, cfg.parity_timesteps, cfg.parity_samples, plan.group_of, plan.n_groups)
    per_group = [
        check_parity(
            fq_graph,
            onnx.load(str(path)),
            [i for i in inputs if plan.group_of(i[0]) == g],
            cosine_threshold=cfg.parity_cosine,
        )
        for g, path in enumerate(exp.graphs)
    ]
    return fq, merge_parity(per_group), _fp_ladder(denoiser, exp.fp_onnx, inputs), inputs


def _evaluate(
    cfg: RunConfig, denoiser: Denoiser, fq: Denoiser, exp: ExportResult, inputs: list
) -> tuple[dict, list[dict], dict]:
    """Samples from FP, fake-quant and the deployed graphs (run as the target's deployed form:
    fused integer kernels where it has them, else plain Q/DQ semantics; TensorRT itself is
    checked by `diffquant validate`), their quality and the per-timestep noise fidelity."""
    fused = get_target(cfg.target).fused_kernels
    engines = [FusedEngineFromOnnx(p) if fused else OrtEngine(p) for p in exp.graphs]
    with GroupedEngine(engines, exp.timestep_groups) as eng:
        deployed = engine_eps_fn(eng, 2 * cfg.batch_size, denoiser.output_names[0])
        samples = _sample_all(cfg, denoiser, fq, deployed)
        noise = noise_fidelity(denoiser, {"fake_quant": torch_eps_fn(fq), "quant": deployed}, list(inputs))
    return _quality(denoiser, samples), noise, samples


def _sample_all(cfg: RunConfig, denoiser: Denoiser, fq: Denoiser, deployed) -> dict:
    """FP, fake-quant and deployed samples from the same seeds and prompts: latents and images."""
    batch = prompt_batch(denoiser, cfg.samples, cfg.seed)
    scfg = SamplerConfig(steps=cfg.steps, guidance=cfg.guidance, batch_size=cfg.batch_size)
    out = {"ids": batch.ids}
    for key, fn in (("fp", torch_eps_fn(denoiser)), ("fake_quant", torch_eps_fn(fq)), ("quant", deployed)):
        lat = sample(
            fn,
            denoiser,
            batch,
            scfg,
            desc=f"sample {key.replace('_', '-') if key != 'quant' else 'deployed'}",
            progress=cfg.progress,
        )
        out[key] = (lat, denoiser.to_images(lat))
    return out


def _quality(denoiser: Denoiser, samples: dict) -> dict:
    """Fidelity to the FP samples for any model; FD and accuracy on the digits classifier's
    features for the builtin digits models (the only feature model there is)."""
    fp_lat, fp_img = samples["fp"]
    if denoiser.family.feature_model:
        clf, (real, _) = load_classifier(), load_digits_tensor()
        out = {"fp": score_samples(fp_img, samples["ids"], clf, real).to_dict()}
        for key in ("fake_quant", "quant"):
            out[key] = score_samples(samples[key][1], samples["ids"], clf, real, reference=fp_img).to_dict()
        return out
    out = {"fp": {}}
    for key in ("fake_quant", "quant"):
        lat, img = samples[key]
        out[key] = score_fidelity(img, fp_img, lat, fp_lat).to_dict()
    return out


def _grids(denoiser: Denoiser, samples: dict, tmp: Path) -> None:
    """PNG grids, each saying what it shows: FP, fake-quant, deployed, and the three side by side
    (FP | fake-quant | deployed per cell; one prompt per row)."""
    imgs = {k: samples[k][1] for k in ("fp", "fake_quant", "quant")}
    n = len(imgs["fp"])
    show = min(n, 50)
    ncol = denoiser.null_id if denoiser.family.feature_model else min(show, 8)  # digits: one column per class
    for key, label in (("fp", "FP"), ("fake_quant", "fake-quant"), ("quant", "deployed")):
        save_grid(
            imgs[key][:show], tmp / f"samples_{key}.png", ncol=ncol, title=f"{label}: first {show} of {n} samples"
        )
    ids = samples["ids"]
    prompts = list(denoiser.prompts) or ["(unconditional)"]
    rows = [[i for i in range(n) if int(ids[i]) == p] for p in sorted({int(v) for v in ids.tolist()})][:10]
    per = min(4, min(len(r) for r in rows))
    order = torch.tensor([i for r in rows for i in r[:per]])
    fp = imgs["fp"][order]
    gap = torch.zeros(len(order), fp.shape[1], fp.shape[2], 1)  # a thin grey line inside a cell; white between cells
    triples = torch.cat([fp, gap, imgs["fake_quant"][order], gap, imgs["quant"][order]], dim=3)
    labels = [prompts[int(ids[r[0]])][:24] if int(ids[r[0]]) < len(prompts) else str(int(ids[r[0]])) for r in rows]
    save_grid(
        triples,
        tmp / "samples_compare.png",
        ncol=per,
        pad=4,
        title=f"each cell: FP | fake-quant | deployed (same seed)\n{len(rows)} prompts x {per} of {n} samples",
        row_labels=labels,
    )
