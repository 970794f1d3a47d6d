"""`validate(run)`: Polygraphy comparisons of a run's graphs on recorded real inputs at several
timesteps, with per-output cosine / SNR verdicts (Polygraphy's comparators) and max-abs.

Comparisons (each a pair of Polygraphy runners on the same inputs):
- ``fp``: torch FP vs ONNX Runtime on ``unet.fp32.onnx`` (ladder step 1),
- ``fake-quant``: torch fake-quant vs ONNX Runtime on the Q/DQ graph(s), fusion off (step 2),
- ``fused``: that reference vs ONNX Runtime with its fused integer kernels (what the CPU runs,
  with the weights `build` would give this CPU),
- ``openvino``: torch fake-quant vs an OpenVINO engine (its FakeQuantize kernels and bf16 or f32
  float layers; only where OpenVINO imports),
- ``tensorrt``: the reference vs a TensorRT engine (step 3; only where TensorRT imports),
- ``pipeline``: whole images from engine folders built from the run (FP denoiser, then the
  quantized one; text encoders, VAE decoder, numpy scheduler) against the diffusers FP pipeline
  on the same prompts, noise and scheduler (`eval.pipeline`; pipeline folders only).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SnrCompareFunc
from polygraphy.json import save_json
from polygraphy.logger import G_LOGGER

from diffquant._check import read_json
from diffquant._groups import group_index
from diffquant._io import atomic_path, write_json, write_text
from diffquant.engines import Engine, EnginesFromFolder, GroupedEngine, OrtEngine
from diffquant.engines.ort import FusedEngineFromOnnx
from diffquant.errors import DiffquantError
from diffquant.eval.pipeline import ImageVerdict, PipelineCheckConfig, compare_pipeline
from diffquant.quant import QuantPlan, apply_plan

__all__ = ["COMPARISONS", "KNOWN", "OutputVerdict", "ValidateConfig", "ValidationResult", "validate"]

# comparison -> (reference runner, candidate runner, default cosine and SNR thresholds)
COMPARISONS = {
    "fp": ("torch-fp", "ort-fp32", 0.99999, 60.0),
    "fake-quant": ("torch-fake-quant", "ort-qdq", 0.99, 20.0),
    "fused": ("ort-qdq", "ort-qdq-fused", 0.99, 20.0),
    # OpenVINO runs the float layers in bf16 by default: judged on cosine 0.99 and the SNR that
    # cosine implies (1 - cos ~ err^2 / 2 signal^2 -> 17 dB), not the 20 dB of an FP32 graph
    "openvino": ("torch-fake-quant", "openvino", 0.99, 17.0),
    "tensorrt": ("ort-qdq", "tensorrt", 0.99, 20.0),
}
ENGINE_BACKENDS = (
    "openvino",
    "tensorrt",
)  # comparisons that need an engine folder, skipped where the runtime is missing
KNOWN = (*COMPARISONS, "pipeline")


@dataclass
class ValidateConfig:
    """Which comparisons, on how many recorded inputs (timesteps x samples, used by the caller
    that records them); ``thresholds`` overrides a comparison's ``{"cosine": c, "snr_db": s}``;
    ``engine`` is an OpenVINO or TensorRT engine folder (default: build one in the run folder)."""

    against: list[str] = field(default_factory=lambda: ["fake-quant", "fp"])
    engine: str = ""
    timesteps: int = 6
    samples: int = 8
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    progress: bool = True
    pipeline: PipelineCheckConfig = field(default_factory=PipelineCheckConfig)


@dataclass
class OutputVerdict:
    comparison: str
    timestep: float
    output: str
    cosine: float
    snr_db: float
    max_abs: float
    cosine_threshold: float
    snr_threshold: float
    passed: bool
    graph: str = ""


@dataclass
class ValidationResult:
    run: str
    rows: list[OutputVerdict] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)
    inputs_file: str = ""
    images: list[ImageVerdict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every requested comparison ran and passed: one that could not run is not a pass."""
        return bool(self.rows or self.images) and all(r.passed for r in [*self.rows, *self.images]) and not self.not_run

    @property
    def verdict(self) -> str:
        if any(not r.passed for r in [*self.rows, *self.images]):
            return "FAIL"
        return "NOT RUN" if self.not_run or not (self.rows or self.images) else "PASS"

    def to_dict(self) -> dict:
        return {
            "run": self.run,
            "passed": self.passed,
            "verdict": self.verdict,
            "rows": [asdict(r) for r in self.rows],
            "images": [r.to_dict() for r in self.images],
            "not_run": self.not_run,
            "inputs_file": self.inputs_file,
        }

    def table(self) -> str:
        lines = (
            [
                "| comparison | timestep | output | cosine | SNR dB | max abs | verdict |",
                "|---|---|---|---|---|---|---|",
            ]
            if self.rows or self.not_run
            else []
        )
        for r in self.rows:
            verdict = (
                "PASS"
                if r.passed
                else f"**FAIL** (needs cosine >= {r.cosine_threshold:g}, SNR >= {r.snr_threshold:g} dB)"
            )
            lines.append(
                f"| {r.comparison} | {r.timestep:g} | {r.output} | {r.cosine:.6f} | {r.snr_db:.1f} | {r.max_abs:.3g} | {verdict} |"
            )
        for name, why in self.not_run.items():
            lines.append(f"| {name} | – | – | – | – | – | not run: {why} |")
        if self.images:
            lines += [
                "",
                "Pipeline images against the diffusers FP pipeline (same prompts, noise, scheduler):",
                "",
                "| denoiser engine | prompt | seed | PSNR dB | SSIM | verdict |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r.engine} | {r.prompt} | {r.seed} | {r.psnr_db:.1f} | {r.ssim:.4f} | "
                f"{'PASS' if r.passed else f'**FAIL** (needs PSNR >= {r.threshold_db:g} dB)'} |"
                for r in self.images
            ]
        return "\n".join(lines)

    def hints(self) -> list[str]:
        """For every failing comparison: which timestep and output, and how to bisect it."""
        out = []
        for r in self.rows:
            if r.passed:
                continue
            msg = f"{r.comparison} fails at timestep {r.timestep:g} on output {r.output!r} (cosine {r.cosine:.6f}, SNR {r.snr_db:.1f} dB)."
            if r.comparison == "tensorrt":
                msg += (
                    f" Bisect the graph with: polygraphy debug reduce {r.graph} -o reduced.onnx --mode=bisect "
                    f"--load-inputs {self.inputs_file} --check polygraphy run polygraphy_debug.onnx --onnxrt --trt --load-inputs {self.inputs_file}"
                )
            elif r.comparison == "fused":
                msg += (
                    " The fused integer kernels (QLinearConv, MatMulIntegerToFloat) requantize in fixed point; dump every "
                    f"tensor with: polygraphy run {r.graph} --onnxrt --onnx-outputs mark all --load-inputs {self.inputs_file} --save-outputs fused.json"
                )
            else:
                msg += f" The per-node local step errors in {self.run}/report.json (parity.worst_tensors) name the Q/DQ node that disagrees first."
            out.append(msg)
        return out


class _FnRunner(BaseRunner):
    """A Polygraphy runner around a numpy feed -> outputs callable (torch models, our engines)."""

    def __init__(self, name: str, fn, inputs: dict[str, tuple[np.dtype, tuple]], outputs: list[str]) -> None:
        super().__init__(name=name, prefix="diffquant")
        self.name = name
        self._fn, self._inputs, self._outputs = fn, inputs, outputs

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for n, (dt, shape) in self._inputs.items():
            meta.add(n, dt, shape)
        return meta

    def infer_impl(self, feed_dict):
        import time

        t0 = time.perf_counter()
        out = self._fn(feed_dict)
        self.inference_time = time.perf_counter() - t0
        return OrderedDict((k, np.asarray(out[k]).astype(np.float32)) for k in self._outputs)


def _torch_fn(model, output: str):
    @torch.no_grad()
    def fn(feeds: dict) -> dict:
        return {output: model(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}).numpy()}

    return fn


def _engine_fn(engine: Engine):
    return lambda feeds: engine.run(dict(feeds))


def _metrics(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    snr = 10 * np.log10(float(a @ a) / max(float(((a - b) ** 2).sum()), 1e-30))
    return cos, float(snr), float(np.abs(a - b).max())


def validate(run_dir: str | Path, denoiser, inputs: list, cfg: ValidateConfig | None = None) -> ValidationResult:
    """Compare a run's graphs per ``cfg.against`` on recorded ``inputs`` ((timestep, named inputs),
    e.g. from `diffquant.workflow.validate_run`); writes ``validate.json`` and ``validate.md``
    into the run folder, plus the inputs in Polygraphy's JSON format for bisecting."""
    cfg = cfg or ValidateConfig()
    run = Path(run_dir)
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our table is the report; Polygraphy's own log stays quiet
    unknown = [a for a in cfg.against if a not in KNOWN]
    if unknown:
        raise DiffquantError(f"unknown comparison(s) {unknown}; choose from {', '.join(KNOWN)}")
    if not (run / "report.json").exists():
        raise DiffquantError(f"{run} is not a run folder (no report.json); make one with `diffquant run`")
    report = read_json(run / "report.json", "make the run folder again with `diffquant run`", required=("onnx",))
    plan = QuantPlan.load(run / "plan")
    feeds = [OrderedDict((s.name, named[s.name].numpy()) for s in denoiser.input_specs()) for _, named in inputs]
    timesteps = [float(ts) for ts, _ in inputs]
    specs = {k: (v.dtype, v.shape) for k, v in feeds[0].items()}
    out_name = denoiser.output_names[0]
    graphs = [run / Path(p).name for p in report.get("graphs", [report["onnx"]])]
    ranges = report.get("timestep_groups", [])
    result = ValidationResult(run=str(run))
    with atomic_path(run / "validate_inputs.json") as tmp:
        save_json(feeds, str(tmp), "validation inputs")
    result.inputs_file = str(run / "validate_inputs.json")

    opened: list[Engine] = []
    makers = {
        "torch-fp": lambda: _torch_fn(denoiser, out_name),
        "torch-fake-quant": lambda: _torch_fn(_fq(denoiser, plan, report.get("target", "tensorrt")), out_name),
        "ort-fp32": lambda: _engine_fn(_keep(opened, OrtEngine(run / "unet.fp32.onnx"))),
        "ort-qdq": lambda: _engine_fn(_keep(opened, GroupedEngine([OrtEngine(g) for g in graphs], ranges))),
        "ort-qdq-fused": lambda: _engine_fn(
            _keep(opened, GroupedEngine([FusedEngineFromOnnx(g) for g in graphs], ranges))
        ),
        "openvino": lambda: _engine_fn(_keep(opened, _built_engine(run, cfg.engine, "openvino"))),
        "tensorrt": lambda: _engine_fn(_keep(opened, _built_engine(run, cfg.engine, "tensorrt"))),
    }
    try:
        for name in [a for a in cfg.against if a != "pipeline"]:
            ref_name, cand_name, cos_thr, snr_thr = COMPARISONS[name]
            thr = cfg.thresholds.get(name, {})
            cos_thr, snr_thr = thr.get("cosine", cos_thr), thr.get("snr_db", snr_thr)
            try:
                runners = [_FnRunner(n, makers[n](), specs, [out_name]) for n in (ref_name, cand_name)]
            except DiffquantError as e:
                if name not in ENGINE_BACKENDS or "not installed" not in str(e):
                    raise
                result.not_run[name] = str(e).split(". ")[0]
                continue
            results = Comparator.run(runners, data_loader=feeds)
            (_, ref_iters), (_, cand_iters) = results[0], results[1]
            cos_f, snr_f = (
                CosineSimilarityCompareFunc(cosine_similarity_threshold=cos_thr),
                SnrCompareFunc(snr_threshold=snr_thr),
            )
            for ts, r_it, c_it in zip(timesteps, ref_iters, cand_iters):
                cos_v, snr_v = cos_f(r_it, c_it), snr_f(r_it, c_it)
                for out in r_it:
                    cos, snr, mx = _metrics(r_it[out], c_it[out])
                    ok = bool(cos_v[out]) and bool(snr_v[out])
                    graph = (
                        graphs[group_index(ts, ranges)]
                        if "qdq" in cand_name or cand_name in ENGINE_BACKENDS
                        else run / "unet.fp32.onnx"
                    )
                    result.rows.append(OutputVerdict(name, ts, out, cos, snr, mx, cos_thr, snr_thr, ok, str(graph)))
    finally:
        for e in opened:
            e.close()
    if "pipeline" in cfg.against:
        _pipeline_check(run, report, denoiser, cfg, result)
    write_json(run / "validate.json", result.to_dict())
    write_text(
        run / "validate.md",
        f"# Validation of {run}\n\n{result.table()}\n\n" + "\n".join(f"- {h}" for h in result.hints()) + "\n",
    )
    return result


def _pipeline_check(run: Path, report: dict, denoiser, cfg: ValidateConfig, result: ValidationResult) -> None:
    """The ``pipeline`` comparison: engine folders built in the run folder (onnxruntime; the FP
    denoiser graph, then the quantized one) against the diffusers pipeline the run was made from."""
    from diffquant.engines.bundle import BuildConfig, build
    from diffquant.models.builtin import weights_dir
    from diffquant.models.loading import load_pipeline

    model = report.get("model", "")
    folder = (
        weights_dir() / "digits-ldm" if model == "builtin:digits-ldm" else Path(model)
    )  # the builtin that is a pipeline
    if not (folder / "model_index.json").is_file():
        result.not_run["pipeline"] = (
            f"{report.get('model')} is not a diffusers pipeline folder (nothing to compare the images with)"
        )
        return
    if not (run / "runtime.json").is_file() or "vae" not in read_json(run / "runtime.json", "export the run again"):
        result.not_run["pipeline"] = "the run holds no pipeline parts (made by an older diffquant); run it again"
        return
    engines = {}
    for label in ("fp", "qdq"):
        engines[label] = run / f"engine-pipeline-{label}"
        if not engines[label].exists():
            build(run, engines[label], BuildConfig(backend="onnxruntime", denoiser=label))
    result.images = compare_pipeline(load_pipeline(folder), denoiser.family, engines, cfg.pipeline)


def _fq(denoiser, plan: QuantPlan, target: str):
    """The fake-quant model of what the graph computes (research-only operand sites left out)."""
    fq = copy.deepcopy(denoiser)
    apply_plan(fq.model, plan, target=target, operands=False)
    return fq


def _keep(opened: list, engine: Engine) -> Engine:
    opened.append(engine)
    return engine


def _built_engine(run: Path, folder: str, backend: str) -> Engine:
    """The engines of ``folder``, or built into ``run/engine-<backend>`` from the run's graph
    (dynamic batch, so every recorded batch fits)."""
    from diffquant.engines.bundle import BuildConfig, build
    from diffquant.engines.openvino import OvBuildConfig, import_openvino
    from diffquant.engines.tensorrt import TrtBuildConfig, import_tensorrt

    (import_tensorrt if backend == "tensorrt" else import_openvino)()
    if not folder:
        folder = str(run / f"engine-{backend}")
        if not Path(folder).exists():
            report = read_json(
                run / "report.json", "make the run folder again with `diffquant run`", required=("onnx",)
            )
            shape = dict(batch=16, dynamic=True, max_batch=64)
            cfg = BuildConfig(backend=backend, tensorrt=TrtBuildConfig(**shape), openvino=OvBuildConfig(**shape))
            build(run / Path(report["onnx"]).name, folder, cfg)
    engine, _ = EnginesFromFolder(folder)
    return engine
