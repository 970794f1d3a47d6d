"""Qua2SeDiMo's measurement of sensitivity: random weight configurations scored against FP, a
predictor of their score fitted (its rank correlation measured on held-out configurations), and
the per-layer marginal effects the budgeted searches read. Used by the `qua2sedimo` pass and by
`diffquant sensitivity` (`analyze`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from diffquant.calib_data import CalibSet
from diffquant.models.denoiser import Denoiser
from diffquant.passes.qua2sedimo.gnn import Space, fit_predictor
from diffquant.passes.qua2sedimo.options import OptionCache, WeightOption
from diffquant.passes.qua2sedimo.predictor import RidgePredictor, ndcg_at_k, spearman
from diffquant.passes.qua2sedimo.sensitivity import SampleProbe, sample_configs, score_config

__all__ = ["SamplingSettings", "Sensitivity", "marginal_effects", "measure_sensitivity", "score_configs"]


class SamplingSettings(Protocol):
    """How configurations are drawn, scored and fitted (the pass's config is one)."""

    configs: int
    holdout: int
    bits: list[int]
    methods: list[str]
    per_step: int
    predictor: str
    score: str
    probe_samples: int
    seed: int

    @property
    def options(self) -> list[WeightOption]: ...


@dataclass
class Sensitivity:
    """What the sampled configurations taught: the scores, the fitted predictor's per-layer
    option effects and its held-out rank correlation, the wall time, and the sample probe
    (``score: samples``) the scores came from."""

    layers: list[str]
    configs: list[dict[str, WeightOption]]
    scores: list[float]
    effects: dict[str, dict[str, float]]
    spearman: float
    ndcg10: float
    seconds: float
    predictor: object = None
    held_out: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured)
    probe: SampleProbe | None = None

    def measure(
        self, denoiser: Denoiser, calib: CalibSet, config: dict[str, WeightOption], cache: OptionCache, per_step: int
    ) -> float:
        """One configuration's score, as the sampled ones were scored."""
        s = score_config(denoiser, config, cache, calib, per_step, probe=self.probe)
        return s.snr_db if self.probe is None else s.sample_psnr


def measure_sensitivity(
    denoiser: Denoiser,
    calib: CalibSet,
    layers: list[str],
    cfg: SamplingSettings,
    cache: OptionCache,
    *,
    progress: bool = True,
) -> Sensitivity:
    """Sample and score ``cfg.configs`` configurations, fit the predictor on all but the last
    ``holdout``, measure its rank correlation on those, then refit on all of them."""
    t0 = time.time()
    configs = sample_configs(layers, cfg.configs, cfg.seed, tuple(cfg.bits), tuple(cfg.methods))
    probe = SampleProbe.build(denoiser, calib, cfg.probe_samples) if cfg.score == "samples" else None
    scores = score_configs(denoiser, calib, configs, cache, cfg.per_step, progress=progress, probe=probe)
    n_train, space = cfg.configs - cfg.holdout, Space(denoiser, layers, cfg.options, cache)
    rho = ndcg = float("nan")
    held: list[tuple[float, float]] = []
    if cfg.holdout:
        pred = fit_predictor(cfg.predictor, space, configs[:n_train], scores[:n_train], seed=cfg.seed)
        got, true = pred.predict(configs[n_train:]), torch.tensor(scores[n_train:])
        rho, ndcg = spearman(got, true), ndcg_at_k(got, true, 10)
        held = [(float(a), float(b)) for a, b in zip(got, true)]
    pred = fit_predictor(cfg.predictor, space, configs, scores, seed=cfg.seed)
    effects = marginal_effects(pred, layers, cfg.options)
    return Sensitivity(layers, configs, scores, effects, rho, ndcg, time.time() - t0, pred, held, probe)


def score_configs(
    denoiser: Denoiser,
    calib: CalibSet,
    configs: list[dict[str, WeightOption]],
    cache: OptionCache,
    per_step: int,
    *,
    progress: bool = True,
    probe: SampleProbe | None = None,
) -> list[float]:
    """Each configuration's noise SNR vs FP (dB) on ``per_step`` inputs per calibration timestep,
    or with a ``probe`` its sample PSNR (dB)."""
    with torch.no_grad():
        reference = {ts: denoiser(**calib.at(ts, per_step)) for ts in calib.timesteps}
    scored = [
        score_config(denoiser, c, cache, calib, per_step, reference, probe)
        for c in tqdm(configs, desc="scoring configurations", disable=not progress)
    ]
    return [s.snr_db if probe is None else s.sample_psnr for s in scored]


def marginal_effects(pred, layers: list[str], options: list[WeightOption]) -> dict[str, dict[str, float]]:
    """Per layer and option, the predicted score when only that layer changes from the base (every
    layer at its first option), minus the base's. Exact for ridge; the GNN's local view."""
    if isinstance(pred, RidgePredictor):
        return pred.layer_effects()
    base = {n: options[0] for n in layers}
    variants = [dict(base, **{n: o}) for n in layers for o in options]
    got = pred.predict([base] + variants)
    b, rest = float(got[0]), got[1:].reshape(len(layers), len(options))
    return {n: {o.label: float(rest[i, j]) - b for j, o in enumerate(options)} for i, n in enumerate(layers)}
