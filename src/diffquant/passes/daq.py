"""The `daq` pass: TCAQ-DM's dynamically adaptive quantizers for post-softmax activations.

Every attention module's probabilities P (the softmax output feeding P.V) become operand sites
of the plan, one per timestep group (``<attention>:operand#g``). For each site and group the
P values seen on the calibration inputs (FP model, a seeded subsample) are tested for a power-law
tail (Clauset-Shalizi-Newman: x_min by KS distance, alpha by maximum likelihood) against
``alternatives`` by Vuong's log-likelihood ratio; a power law gets the log2 quantizer
(x = s * 2^-q, s = the largest P seen), anything else the uniform grid (step = largest P / qmax).
Both at the activation bits of the plan (``bits`` overrides).

The paper has no code; the choices made here (config fields where they are choices):
- the decision: the power law must fit significantly better (Vuong p < ``p_value``) than at
  least one alternative and significantly worse than none. A lognormal often cannot be told
  apart from a power law on one tail (CSN, section 5); demanding a significant win over it too
  would almost never choose log2.
- P is observed on the FP model (the distribution's shape, not the quantized model's drift).
- Deployment: no graph carries these sites. TensorRT's rules forbid Q/DQ on the attention
  matmuls, so P stays FP16 there; the ONNX Runtime lowering of a uniform choice is not built.
  The research form (the fake-quant model) quantizes P; the deployed graph does not; results
  show both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from diffquant.errors import DiffquantError
from diffquant.passes.context import PassContext
from diffquant.passes.observe.powerlaw import ALTERNATIVES, compare, fit_power_law
from diffquant.passes.registry import register_pass
from diffquant.quant.attention import attention_modules, install_probs_hooks, remove_probs_hooks
from diffquant.quant.fake import round_scale
from diffquant.quant.format import QuantFormat, parse_bits
from diffquant.quant.plan import PassReport
from diffquant.quant.site import Site, SiteKey

__all__ = ["DAQConfig", "ProbsRecorder", "daq_pass"]

MODES = ("adaptive", "uniform", "log2")


@dataclass
class DAQConfig:
    """``bits`` 0 takes the plan's activation bits; ``samples`` P values kept per site and group;
    ``p_value`` the significance of Vuong's test; ``candidates`` x_min values tried. ``mode``
    uniform (every P on the uniform grid: the quantizer DAQ improves on) or log2 is the ablation."""

    version: int = 1
    enabled: bool = True  # false: no sites, P stays floating point in the research form too
    mode: str = "adaptive"  # adaptive: the power-law test decides; uniform / log2: every site (the ablation)
    bits: int = 0
    alternatives: list[str] = field(default_factory=lambda: list(ALTERNATIVES))
    p_value: float = 0.1
    samples: int = 20000
    candidates: int = 50
    tail_min: int = 50
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.alternatives or set(self.alternatives) - set(ALTERNATIVES):
            raise ValueError(f"alternatives must be a non-empty list of {ALTERNATIVES}, got {self.alternatives}")
        if not 0 <= self.bits <= 8 or not 0 < self.p_value < 1 or self.samples < 100:
            raise ValueError(
                f"need bits 0..8 (0: the plan's), p_value in (0, 1), samples >= 100; got {self.bits}, {self.p_value}, "
                f"{self.samples}"
            )


class ProbsRecorder:
    """A probs hook that keeps a seeded subsample of P per timestep group, and the largest P."""

    def __init__(self, per_call: int, gen: torch.Generator) -> None:
        self.per_call, self.gen, self.group = per_call, gen, 0
        self.values: dict[int, list[torch.Tensor]] = {}
        self.amax: dict[int, float] = {}

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        flat = p.detach().reshape(-1).float()
        idx = torch.randint(0, flat.numel(), (min(self.per_call, flat.numel()),), generator=self.gen)
        self.values.setdefault(self.group, []).append(flat[idx])
        self.amax[self.group] = max(self.amax.get(self.group, 0.0), float(flat.max()))
        return p


def _observe(ctx: PassContext, names: list[str], cfg: DAQConfig) -> dict[str, ProbsRecorder]:
    """Run the FP model over the calibration set with a recorder on every attention's P."""
    batches = list(ctx.calib.batches(cfg.batch_size))
    per_call = max(1, cfg.samples // max(1, len(batches) // ctx.plan.n_groups))
    gen = torch.Generator().manual_seed(cfg.seed)
    recs = {n: ProbsRecorder(per_call, gen) for n in names}
    install_probs_hooks(ctx.denoiser.model, dict(recs))
    try:
        with torch.no_grad():
            for ts, inputs in tqdm(batches, desc="daq: observe P", leave=False, disable=not ctx.progress):
                for r in recs.values():
                    r.group = ctx.plan.group_of(ts)
                ctx.denoiser(**inputs)
    finally:
        remove_probs_hooks(ctx.denoiser.model)
    return recs


def _choose(values: np.ndarray, cfg: DAQConfig) -> tuple[str, list]:
    """log2 or uniform for one site and group, and the report's evidence."""
    fit = fit_power_law(values, cfg.candidates, cfg.tail_min)
    if fit is None:
        return "uniform", [None, None, None] + [None, None] * len(cfg.alternatives)
    tests = [compare(fit, a) for a in cfg.alternatives]
    worse = any(t.llr < 0 and t.p < cfg.p_value for t in tests)
    kind = "log2" if any(t.power_law_wins(cfg.p_value) for t in tests) and not worse else "uniform"
    return kind, [fit.xmin, fit.alpha, fit.n] + [v for t in tests for v in (t.llr, t.p)]


@register_pass("daq", DAQConfig)
def daq_pass(ctx: PassContext, cfg: DAQConfig) -> None:
    """Give every attention module's P a log2 or uniform quantizer per timestep group."""
    plan = ctx.plan
    if not cfg.enabled:
        return
    names = list(attention_modules(ctx.denoiser.model))
    act = parse_bits(plan.request).act
    bits = cfg.bits or (act.bits if act is not None else 0)
    if not bits:
        raise DiffquantError(
            f"daq: the plan's bits {plan.request} leave activations in floating point, so P has no bit width; set "
            "daq.bits (e.g. 8)"
        )
    cols = (
        ["attention", "group", "P values", "x_min", "alpha", "tail"]
        + [f"{h} vs {a}" for a in cfg.alternatives for h in ("LLR", "p")]
        + ["choice"]
    )
    report = PassReport(
        "daq",
        f"DAQ: post-softmax quantizers at {bits} bits (research form; the deployed graph keeps P in floating point)",
        cols,
    )
    plan.reports.append(report)
    if not names:
        report.notes.append("this denoiser has no attention modules")
        return
    recs = _observe(ctx, names, cfg)
    for name in names:
        for g in range(plan.n_groups):
            vals = recs[name].values.get(g)
            if not vals:
                continue
            x = torch.cat(vals).numpy()
            kind, evidence = _choose(x, cfg)
            kind = kind if cfg.mode == "adaptive" else cfg.mode
            fmt = QuantFormat(bits=bits, kind=kind)
            top = recs[name].amax[g]
            scale = top if kind == "log2" else top / fmt.qmax
            plan.operands[str(SiteKey(name, "operand", g))] = Site(
                SiteKey(name, "operand", g), fmt, round_scale(torch.tensor([max(scale, 1e-8)]))
            )
            report.rows.append([name, g, len(x)] + evidence + [kind])
    chosen = [r[-1] for r in report.rows]
    report.notes.append(
        f"{chosen.count('log2')} of {len(chosen)} site-groups log2 (power law), {chosen.count('uniform')} uniform"
    )
