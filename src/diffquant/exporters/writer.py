"""`export(plan, denoiser, out)`: the FP graph for the ladder, the Q/DQ graph(s) for a target
(one per timestep group), and what a torch-free runtime needs to sample with them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from diffquant._io import atomic_path, write_json
from diffquant.artifacts import (
    CONDITIONING_FILE,
    FP_GRAPH,
    PARTS_FILE,
    REALIZED_FILE,
    RUNTIME_VERSION,
    ConditioningEntry,
    GraphEntry,
    InputEntry,
    RuntimeSpec,
    SamplerEntry,
    TextEntry,
    VaeEntry,
    graph_file,
)
from diffquant.errors import DiffquantError
from diffquant.exporters.linter import LintReport, lint
from diffquant.exporters.onnx_fp import fp_onnx_proto, save_onnx
from diffquant.exporters.parts import PartReport, PartsConfig, export_parts
from diffquant.exporters.qdq import LoweringResult, lower_plan
from diffquant.models.denoiser import Denoiser
from diffquant.quant.plan import QuantPlan, weights_digest
from diffquant.targets import get_target

__all__ = ["ExportResult", "export"]


@dataclass
class ExportResult:
    """Paths and figures of one export; ``realized``/``act_dq``/``lint`` are group 0's."""

    fp_onnx: Path
    qdq_onnx: Path
    realized: dict
    act_dq: dict
    lint: LintReport
    graphs: list[Path] = field(default_factory=list)
    timestep_groups: list[list[float]] = field(default_factory=list)
    parts: list[PartReport] = field(default_factory=list)


def export(
    plan: QuantPlan,
    denoiser: Denoiser,
    out_dir: str | Path,
    target: str = "tensorrt",
    float_dtype: str | None = None,
    parts: PartsConfig | None = None,
) -> ExportResult:
    """Write ``unet.fp32.onnx`` (ladder step 1), the deployable Q/DQ graph(s), ``realized.json``,
    the pipeline parts (text encoders with tokenizers, VAE decoder; `exporters.parts`, checked in
    ``parts.json``) and the runtime bundle (``runtime.json``, ``conditioning.safetensors``) into
    ``out_dir``. Refuses an unfrozen plan or one made for other weights, and lints every graph first."""
    if plan.state not in ("frozen", "exported"):
        raise DiffquantError(f"plan for {plan.model} is {plan.state!r}: export needs a frozen plan")
    if plan.model_digest != weights_digest(denoiser.model):
        raise DiffquantError(f"plan was made for weights {plan.model_digest}, not {denoiser.name}'s; quantize again")
    fdtype = float_dtype or get_target(target).float_dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = fp_onnx_proto(denoiser, "float32")
    base = fp32 if fdtype == "float32" else fp_onnx_proto(denoiser, fdtype)
    weights = denoiser.model.state_dict()
    lowered = [lower_plan(base, plan, target, weights=weights, group=g) for g in range(plan.n_groups)]
    reports = [_lint_or_refuse(low, graph_file(g, plan.n_groups), out, target) for g, low in enumerate(lowered)]
    save_onnx(fp32, out / FP_GRAPH)
    graphs = [save_onnx(low.model, out / graph_file(g, plan.n_groups)) for g, low in enumerate(lowered)]
    realized = {"target": target, "float_dtype": fdtype, "layers": lowered[0].realized, "skipped": plan.skipped}
    write_json(out / REALIZED_FILE, {**realized, "timestep_groups": plan.timestep_groups})
    text, vae, part_reports = export_parts(denoiser, out, target, parts)
    if part_reports:
        write_json(out / PARTS_FILE, {"target": target, "parts": [r.to_dict() for r in part_reports]})
    entries = [GraphEntry(p.name, r) for p, r in zip(graphs, plan.timestep_groups or [[]])]
    write_runtime_bundle(denoiser, out, target, plan.request, entries, text, vae)
    plan.state = "exported"
    first = lowered[0]
    return ExportResult(
        out / FP_GRAPH, graphs[0], first.realized, first.act_dq, reports[0], graphs, plan.timestep_groups, part_reports
    )


def _lint_or_refuse(low: LoweringResult, name: str, out: Path, target: str) -> LintReport:
    report = lint(low.model, str(out / name), target=target)
    if not report.ok:
        lines = "\n  ".join(str(v) for v in report.violations[:20])
        raise DiffquantError(f"the lowered graph {name} breaks {target} rules (nothing written):\n  {lines}")
    return report


def write_runtime_bundle(
    denoiser: Denoiser,
    out: Path,
    target: str,
    bits: str,
    graphs: list[GraphEntry],
    text: TextEntry | None = None,
    vae: dict[str, VaeEntry] | None = None,
) -> RuntimeSpec:
    """What `generate` needs without torch: the prompt table (every conditioning input, one row
    per calibrated prompt and the negative / null row last), the static inputs, the sampler
    (scheduler config, kind, flow-matching arguments, how timesteps are fed), the named input
    specs with an example shape each, the graphs with their timestep ranges, and the pipeline
    parts (``text``: encoders, tokenizers and how their outputs make the conditioning; ``vae``)."""
    fam = denoiser.family
    tensors = {f"cond.{k}": np.ascontiguousarray(v.numpy()) for k, v in denoiser.conditioning.items()}
    statics = fam.static_inputs(denoiser.conditioning)
    tensors.update({f"static.{k}": np.ascontiguousarray(v.numpy()) for k, v in statics.items()})
    with atomic_path(out / CONDITIONING_FILE) as tmp:
        save_file(tensors or {"empty": np.zeros(1, np.float32)}, str(tmp))
    example = denoiser.example_inputs(1)
    sched = dict(denoiser.scheduler)
    flow = fam.flow_kwargs(1, sched)  # mu depends on the resolution only; sigmas on the steps (rebuilt at run time)
    spec = RuntimeSpec(
        version=RUNTIME_VERSION,
        model=denoiser.name,
        family=fam.name,
        target=target,
        bits=bits,
        sample_shape=list(denoiser.sample_shape),
        latent=denoiser.vae is not None,
        inputs=[InputEntry(**s.to_dict(), example=list(example[s.name].shape)) for s in denoiser.input_specs()],
        output=denoiser.output_names[0],
        conditioning=ConditioningEntry(
            CONDITIONING_FILE, list(denoiser.prompts), denoiser.null_id, fam.prompt_separator
        ),
        sampler=SamplerEntry(
            kind=fam.sampler,
            guidance=fam.guidance,
            default_guidance=fam.default_guidance,
            timestep_scale=fam.model_timestep(1000.0) / 1000.0,
            flow_sigmas="linspace" if "sigmas" in flow else "scheduler",
            mu=flow.get("mu"),
        ),
        scheduler=sched,
        graphs=graphs,
        resolution=list(fam.resolution),
        text=text,
        vae=vae,
    )
    spec.write(out)
    return spec
