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

from diffquant._groups import group_index
from diffquant._io import atomic_path, write_json, write_text
from diffquant.artifacts import FP_GRAPH, RUNTIME_FILE, RunReport, RuntimeSpec
from diffquant.engines import BACKENDS, BuildConfig, Engine, EnginesFromFolder, GroupedEngine, OrtEngine, build
from diffquant.engines.base import BatchProfile
from diffquant.engines.ort import FusedEngineFromOnnx
from diffquant.errors import DiffquantError
from diffquant.eval.pipeline_parity import ImageVerdict, PipelineCheckConfig, compare_pipeline
from diffquant.quant import QuantPlan, apply_plan

__all__ = ["OutputVerdict", "ValidateConfig", "ValidationResult", "comparisons", "validate"]

# comparison -> (reference runner, candidate runner, default cosine and SNR thresholds)
BUILTIN_COMPARISONS = {
    "fp": ("torch-fp", "ort-fp32", 0.99999, 60.0),
    "fake-quant": ("torch-fake-quant", "ort-qdq", 0.99, 20.0),
    "fused": ("ort-qdq", "ort-qdq-fused", 0.99, 20.0),
}


def comparisons() -> dict[str, tuple[str, str, float, float]]:
    """The built-in comparisons, then one per registered backend that names its reference
    (`Backend.validate`): it needs an engine folder, and is "not run" where the backend's runtime
    is missing."""
    engines = {b.name: (b.validate[0], b.name, *b.validate[1:]) for b in BACKENDS.values() if b.validate}
    return {**BUILTIN_COMPARISONS, **engines}


def _engine_backends() -> tuple[str, ...]:
    return tuple(b.name for b in BACKENDS.values() if b.validate)


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
                f"| {r.comparison} | {r.timestep:g} | {r.output} | {r.cosine:.6f} | {r.snr_db:.1f} | {r.max_abs:.3g} "
                f"| {verdict} |"
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
            msg = (
                f"{r.comparison} fails at timestep {r.timestep:g} on output {r.output!r} "
                f"(cosine {r.cosine:.6f}, SNR {r.snr_db:.1f} dB)."
            )
            bisect = BACKENDS[r.comparison].bisect if r.comparison in BACKENDS else ""
            if bisect:
                msg += " " + bisect.format(graph=r.graph, inputs=self.inputs_file)
            elif r.comparison == "fused":
                msg += (
                    " The fused integer kernels (QLinearConv, MatMulIntegerToFloat) requantize in fixed point; dump "
                    f"every tensor with: polygraphy run {r.graph} --onnxrt --onnx-outputs mark all --load-inputs "
                    f"{self.inputs_file} --save-outputs fused.json"
                )
            else:
                msg += (
                    f" The per-node local step errors in {self.run}/report.json (parity.worst_tensors) name the Q/DQ "
                    "node that disagrees first."
                )
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


def validate(
    run_dir: str | Path, denoiser, inputs: list, cfg: ValidateConfig | None = None, report: RunReport | None = None
) -> ValidationResult:
    """Compare a run's graphs per ``cfg.against`` on recorded ``inputs`` ((timestep, named inputs),
    e.g. from `diffquant.jobs.validate.validate_run`); writes ``validate.json`` and ``validate.md``
    into the run folder, plus the inputs in Polygraphy's JSON format for bisecting."""
    cfg = cfg or ValidateConfig()
    run = Path(run_dir)
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our table is the report; Polygraphy's own log stays quiet
    known = [*comparisons(), "pipeline"]
    unknown = [a for a in cfg.against if a not in known]
    if unknown:
        raise DiffquantError(f"unknown comparison(s) {unknown}; choose from {', '.join(known)}")
    report = report or RunReport.read(run)
    check = _Comparisons(run, report, denoiser, inputs, cfg)
    result = ValidationResult(run=str(run), inputs_file=check.save_inputs())
    try:
        for name in [a for a in cfg.against if a != "pipeline"]:
            check.compare(name, result)
    finally:
        check.close()
    if "pipeline" in cfg.against:
        _pipeline_check(run, report, denoiser, cfg, result)
    write_json(run / "validate.json", result.to_dict())
    hints = "\n".join(f"- {h}" for h in result.hints())
    write_text(run / "validate.md", f"# Validation of {run}\n\n{result.table()}\n\n{hints}\n")
    return result


class _Comparisons:
    """The runners of one validation, made on first use and closed at the end, and how a
    comparison of two of them on the recorded inputs becomes verdict rows."""

    def __init__(self, run: Path, report: RunReport, denoiser, inputs: list, cfg: ValidateConfig) -> None:
        self.run, self.report, self.denoiser, self.cfg = run, report, denoiser, cfg
        self.feeds = [
            OrderedDict((s.name, named[s.name].numpy()) for s in denoiser.input_specs()) for _, named in inputs
        ]
        self.timesteps = [float(ts) for ts, _ in inputs]
        self.specs = {k: (v.dtype, v.shape) for k, v in self.feeds[0].items()}
        self.out_name = denoiser.output_names[0]
        self.graphs = report.graph_files(run) if report.graphs else [run / Path(report.onnx).name]
        self.ranges = report.timestep_groups
        self.plan = QuantPlan.load(run / "plan")
        self.opened: list[Engine] = []

    def save_inputs(self) -> str:
        path = self.run / "validate_inputs.json"
        with atomic_path(path) as tmp:
            save_json(self.feeds, str(tmp), "validation inputs")
        return str(path)

    def _engine(self, engine: Engine):
        self.opened.append(engine)
        return _engine_fn(engine)

    def _make(self, runner: str):
        graphs, ranges = self.graphs, self.ranges
        if runner == "torch-fp":
            return _torch_fn(self.denoiser, self.out_name)
        if runner == "torch-fake-quant":
            return _torch_fn(_fq(self.denoiser, self.plan, self.report.target), self.out_name)
        if runner == "ort-fp32":
            return self._engine(OrtEngine(self.run / FP_GRAPH))
        if runner == "ort-qdq":
            return self._engine(GroupedEngine([OrtEngine(g) for g in graphs], ranges))
        if runner == "ort-qdq-fused":
            return self._engine(GroupedEngine([FusedEngineFromOnnx(g) for g in graphs], ranges))
        return self._engine(_built_engine(self.run, self.report, self.cfg.engine, runner))

    def compare(self, name: str, result: ValidationResult) -> None:
        """Run comparison ``name``; its rows into ``result`` (or why it could not run)."""
        ref_name, cand_name, cos_thr, snr_thr = comparisons()[name]
        thr = self.cfg.thresholds.get(name, {})
        cos_thr, snr_thr = thr.get("cosine", cos_thr), thr.get("snr_db", snr_thr)
        try:
            runners = [_FnRunner(n, self._make(n), self.specs, [self.out_name]) for n in (ref_name, cand_name)]
        except DiffquantError as e:
            if name not in _engine_backends() or "not installed" not in str(e):
                raise
            result.not_run[name] = str(e).split(". ")[0]
            return
        (_, ref_iters), (_, cand_iters) = Comparator.run(runners, data_loader=self.feeds)
        cos_f = CosineSimilarityCompareFunc(cosine_similarity_threshold=cos_thr)
        snr_f = SnrCompareFunc(snr_threshold=snr_thr)
        quantized = "qdq" in cand_name or cand_name in _engine_backends()
        for ts, r_it, c_it in zip(self.timesteps, ref_iters, cand_iters):
            cos_v, snr_v = cos_f(r_it, c_it), snr_f(r_it, c_it)
            graph = self.graphs[group_index(ts, self.ranges)] if quantized else self.run / FP_GRAPH
            for out in r_it:
                cos, snr, mx = _metrics(r_it[out], c_it[out])
                ok = bool(cos_v[out]) and bool(snr_v[out])
                result.rows.append(OutputVerdict(name, ts, out, cos, snr, mx, cos_thr, snr_thr, ok, str(graph)))

    def close(self) -> None:
        for e in self.opened:
            e.close()


def _pipeline_check(run: Path, report: RunReport, denoiser, cfg: ValidateConfig, result: ValidationResult) -> None:
    """The ``pipeline`` comparison: engine folders built in the run folder (onnxruntime; the FP
    denoiser graph, then the quantized one) against the diffusers pipeline the run was made from."""
    from diffquant.models.loading import load_pipeline
    from diffquant.zoo.builtin import weights_dir

    model = report.model
    folder = weights_dir() / "digits-ldm" if model == "builtin:digits-ldm" else Path(model)  # the builtin pipeline
    if not (folder / "model_index.json").is_file():
        result.not_run["pipeline"] = f"{model} is not a diffusers pipeline folder (nothing to compare the images with)"
        return
    if not (run / RUNTIME_FILE).is_file() or RuntimeSpec.read(run, "export the run again").vae is None:
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


def _built_engine(run: Path, report: RunReport, folder: str, backend: str) -> Engine:
    """The engines of ``folder``, or built into ``run/engine-<backend>`` from the run's graph
    (dynamic batch where the backend has a profile, so every recorded batch fits)."""
    b = BACKENDS[backend]
    b.require()
    if not folder:
        folder = str(run / f"engine-{backend}")
        if not Path(folder).exists():
            shape = {"batch": 16, "dynamic": True, "max_batch": 64}
            settings = b.settings(**shape) if issubclass(b.settings, BatchProfile) else b.settings()
            build(run / Path(report.onnx).name, folder, BuildConfig(backend=backend, settings=settings))
    engine, _ = EnginesFromFolder(folder)
    return engine
