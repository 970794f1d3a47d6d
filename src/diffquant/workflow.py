"""The `run` job: calibrate -> quantize -> export -> ONNX Runtime -> parity and quality -> report.

Everything is written into a hidden temp folder beside ``out`` and renamed onto ``out`` only when
the whole job succeeded, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from diffquant._io import write_json
from diffquant.calib_data import CalibConfig, collect
from diffquant.calib_data.collect import pick_inputs
from diffquant.engines import Engine, GroupedEngine, OrtEngine
from diffquant.errors import DiffquantError
from diffquant.eval import check_parity, merge_parity, save_grid, score_samples, write_markdown
from diffquant.eval.validate import ValidateConfig, validate
from diffquant.exporters import export
from diffquant.models.data import load_digits_tensor
from diffquant.models.denoiser import Denoiser
from diffquant.models.loading import load_classifier, load_denoiser
from diffquant.models.sampler import SamplerConfig, class_batch, ddim_sample
from diffquant.pipeline import load_recipe, quantize
from diffquant.quant import QuantPlan, apply_plan
from diffquant.quant.format import parse_bits

__all__ = ["RunConfig", "engine_eps_fn", "run_job", "validate_run"]


@dataclass
class RunConfig:
    """Settings of one `diffquant run` (defaults: the BENCHMARK.md protocol at N = 256)."""

    model: str = "builtin:digits-sd"
    recipe: str = "minmax"
    bits: str | None = None
    target: str = "tensorrt"
    timestep_groups: int = 1
    out: str = "runs/sd-w8a8"
    samples: int = 256
    steps: int = 25
    guidance: float = 3.0
    seed: int = 0
    calib_samples: int = 64
    calib_timesteps: int = 25
    parity_samples: int = 8
    parity_timesteps: int = 4
    parity_cosine: float = 0.99
    batch_size: int = 128
    progress: bool = True
    overrides: dict = field(default_factory=dict)  # pass name -> option values replacing the recipe's


def engine_eps_fn(engine: Engine, batch: int = 256):
    """Wrap an engine as a torch noise-prediction function for the sampler."""

    def eps(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, len(x), batch):
            feeds = {"sample": x[i : i + batch].numpy(), "timestep": t[i : i + batch].numpy(), "cond": c[i : i + batch].numpy()}
            outs.append(engine.run(feeds)["noise_pred"].astype(np.float32))
        return torch.from_numpy(np.concatenate(outs))

    return eps


def _fp_ladder(denoiser: Denoiser, path: Path, inputs) -> float:
    """Ladder step 1: relative max error of ORT on the FP32 ONNX vs torch FP."""
    worst = 0.0
    with OrtEngine(path) as eng, torch.no_grad():
        for _, x, t, c in inputs:
            ref = denoiser(x, t, c).numpy()
            got = eng.run({"sample": x.numpy(), "timestep": t.numpy(), "cond": c.numpy()})["noise_pred"]
            worst = max(worst, float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)))
    return worst


def run_job(cfg: RunConfig) -> dict:
    """Run the whole job; returns the report dict (also written to ``out/report.json``)."""
    out = Path(cfg.out)
    if out.exists():
        raise DiffquantError(f"output folder {out} already exists; pass another --out or delete it")
    recipe = load_recipe(cfg.recipe, cfg.overrides)
    bits = parse_bits(cfg.bits or recipe.bits).text
    if cfg.samples < 10:
        raise DiffquantError(f"--samples must be at least 10 (one per class), got {cfg.samples}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        report = _run(cfg, recipe, bits, tmp, out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report


def _run(cfg: RunConfig, recipe, bits: str, tmp: Path, out: Path) -> dict:
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    denoiser = load_denoiser(cfg.model)
    calib = collect(denoiser, CalibConfig(samples=cfg.calib_samples, steps=cfg.steps, timesteps=cfg.calib_timesteps, guidance=cfg.guidance), progress=cfg.progress)
    timings["calibrate_s"] = time.time() - t0

    t0 = time.time()
    plan = quantize(denoiser, recipe, calib, bits=bits, progress=cfg.progress, timestep_groups=cfg.timestep_groups)
    plan.save(tmp / "plan")
    timings["quantize_s"] = time.time() - t0

    t0 = time.time()
    exp = export(plan, denoiser, tmp, target=cfg.target)
    timings["export_s"] = time.time() - t0

    t0 = time.time()
    fq = copy.deepcopy(denoiser)
    apply_plan(fq.model, plan, target=cfg.target)
    inputs = pick_inputs(calib, cfg.parity_timesteps, cfg.parity_samples, plan.group_of, plan.n_groups)
    parity = merge_parity(
        [check_parity(fq, onnx.load(str(path)), [i for i in inputs if plan.group_of(i[0]) == g], cosine_threshold=cfg.parity_cosine) for g, path in enumerate(exp.graphs)]
    )
    ladder_fp = _fp_ladder(denoiser, exp.fp_onnx, inputs)

    batch = class_batch(denoiser, cfg.samples, cfg.seed)
    ids = batch.ids
    scfg = SamplerConfig(steps=cfg.steps, guidance=cfg.guidance, batch_size=cfg.batch_size)
    common = dict(noise=batch.noise, cond=batch.cond, uncond=batch.uncond, scheduler_config=denoiser.scheduler, cfg=scfg, progress=cfg.progress)
    fp_imgs = ddim_sample(denoiser, desc="sample FP", **common)
    fq_imgs = ddim_sample(fq, desc="sample fake-quant", **common)
    # the deployed form: ORT-target graphs run with their fused integer kernels; TensorRT-target
    # graphs run here with plain Q/DQ semantics (TensorRT itself is validated by `diffquant validate`)
    fused = cfg.target == "onnxruntime"
    with GroupedEngine([OrtEngine(p, qdq_fusion=fused) for p in exp.graphs], exp.timestep_groups) as eng:
        q_imgs = ddim_sample(engine_eps_fn(eng, 2 * cfg.batch_size), desc="sample deployed", **common)
    clf = load_classifier()
    real, _ = load_digits_tensor()
    q_fp = score_samples(fp_imgs, ids, clf, real)
    q_fq = score_samples(fq_imgs, ids, clf, real, reference=fp_imgs)
    q_q = score_samples(q_imgs, ids, clf, real, reference=fp_imgs)
    timings["evaluate_s"] = time.time() - t0

    show = min(cfg.samples, 50)
    save_grid(fp_imgs[:show], tmp / "samples_fp.png")
    save_grid(fq_imgs[:show], tmp / "samples_fake_quant.png")
    save_grid(q_imgs[:show], tmp / "samples_quant.png")
    gap = torch.ones(show, 1, fp_imgs.shape[2], 4)
    save_grid(torch.cat([fp_imgs[:show], gap, fq_imgs[:show], gap, q_imgs[:show]], dim=3), tmp / "samples_compare.png", ncol=5)

    report = {
        "model": cfg.model,
        "recipe": recipe.name,
        "bits": bits,
        "target": cfg.target,
        "onnx": str(out / exp.qdq_onnx.name),
        "graphs": [str(out / p.name) for p in exp.graphs],
        "timestep_groups": exp.timestep_groups,
        "deployed_qdq_fusion": fused,
        "fp_onnx": str(out / exp.fp_onnx.name),
        "plan": str(out / "plan"),
        "parity": parity.to_dict(),
        "ladder": {"fp32_onnx_rel_max_error": ladder_fp},
        "quality": {"fp": q_fp.to_dict(), "quant": q_q.to_dict(), "fake_quant": q_fq.to_dict()},
        "timings": timings,
        "settings": asdict(cfg),
        "realized": exp.realized,
        "skipped": plan.skipped,
        "lint": {"violations": len(exp.lint.violations), "q_nodes": exp.lint.n_q, "dq_nodes": exp.lint.n_dq},
    }
    write_json(tmp / "report.json", report)
    write_markdown(report, tmp / "report.md")
    return report


def validate_run(run_dir: str | Path, cfg: ValidateConfig | None = None):
    """`diffquant validate`: the run's model and recorded inputs from its (cached) calibration
    data at ``cfg.timesteps`` timesteps (each timestep group covered), then `eval.validate`."""
    cfg = cfg or ValidateConfig()
    run = Path(run_dir)
    rpath = run / "report.json"
    if not rpath.exists():
        raise DiffquantError(f"{run} is not a run folder (no report.json); make one with `diffquant run`")
    report = json.loads(rpath.read_text())
    denoiser = load_denoiser(report["model"])
    plan = QuantPlan.load(run / "plan")
    st = report["settings"]
    calib = collect(denoiser, CalibConfig(samples=st["calib_samples"], steps=st["steps"], timesteps=st["calib_timesteps"], guidance=st["guidance"]), progress=cfg.progress)
    return validate(run, denoiser, pick_inputs(calib, cfg.timesteps, cfg.samples, plan.group_of, plan.n_groups), cfg)
