"""Qua2SeDiMo's raw material: random weight configurations over every Conv/Linear layer and a
fidelity score of each against the FP model, from which the predictor and the importance scores
are learned. A configuration maps each layer to a `WeightOption`; applying it replaces the
weights by their dequantized option (activations stay FP: the search is over weights).

Two scores: the noise-prediction SNR on recorded FP inputs (one forward pass per timestep; cheap,
but blind to error that accumulates along the trajectory), and `SampleProbe`'s PSNR of whole
samples from fixed seeds against the FP samples of the same seeds (the issue's "PSNR of samples";
it sees the accumulation, at one sampling run per configuration).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from torch import nn

from diffquant.calib_data import CalibSet
from diffquant.models.denoiser import Denoiser
from diffquant.models.sampler import PromptBatch, SamplerConfig, prompt_batch, sample
from diffquant.passes.qua2sedimo.options import METHODS, OptionCache, WeightOption
from diffquant.quant.targeting import QUANTIZABLE

__all__ = [
    "ConfigScore",
    "SampleProbe",
    "apply_config",
    "block_of",
    "config_bits",
    "layer_importance",
    "op_type",
    "sample_configs",
    "score_config",
    "weight_layers",
]


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d / Linear of the denoiser, the time embedding and final projection included."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


def sample_configs(
    layers: list[str], m: int, seed: int = 0, bits: tuple[int, ...] = (3, 4), methods: tuple[str, ...] = METHODS
) -> list[dict[str, WeightOption]]:
    """``m`` random configurations as the paper draws them: per configuration p ~ U(0, 1); each
    layer takes the low bit width with probability p (else one of the others, uniformly: the
    paper has only two), and a method uniformly."""
    rng = random.Random(seed)
    out = []
    for _ in range(m):
        p = rng.random()
        out.append(
            {
                n: WeightOption(rng.choice(methods), bits[0] if rng.random() < p else rng.choice(bits[1:]))
                for n in layers
            }
        )
    return out


def config_bits(model: nn.Module, config: dict[str, WeightOption], cache: OptionCache) -> float:
    """Average weight bits over the configured layers, scales / zero points / codebooks in FP16 counted."""
    layers = weight_layers(model)
    total = n = 0
    for name, opt in config.items():
        w = layers[name].weight
        total += cache.get(w, opt).avg_bits() * w.numel()
        n += w.numel()
    return total / n if n else 16.0


def apply_config(denoiser: Denoiser, config: dict[str, WeightOption], cache: OptionCache) -> Denoiser:
    """A copy of ``denoiser`` whose configured layers hold their dequantized option weights."""
    out = copy.deepcopy(denoiser)
    src, dst = weight_layers(denoiser.model), weight_layers(out.model)
    with torch.no_grad():
        for name, opt in config.items():
            dst[name].weight.copy_(cache.get(src[name].weight, opt).dequantize().to(dst[name].weight.dtype))
    return out


@dataclass
class ConfigScore:
    """A configuration's fidelity to FP: noise-prediction SNR in dB over fixed recorded inputs
    (higher is better), its average weight bits, and its sample PSNR where a probe was given."""

    snr_db: float
    avg_bits: float
    sample_psnr: float | None = None


def score_config(
    denoiser: Denoiser,
    config: dict[str, WeightOption],
    cache: OptionCache,
    calib: CalibSet,
    per_step: int = 4,
    reference: dict[float, torch.Tensor] | None = None,
    probe: SampleProbe | None = None,
) -> ConfigScore:
    """Score ``config`` on ``per_step`` recorded inputs at every calibration timestep (pass the FP
    predictions as ``reference``, timestep -> tensor, to reuse them), and by ``probe``'s samples."""
    q = apply_config(denoiser, config, cache)
    sig = err = 0.0
    with torch.no_grad():
        for ts in calib.timesteps:
            named = calib.at(ts, per_step)
            ref = reference[ts] if reference is not None else denoiser(**named)
            got = q(**named)
            sig += float((ref.double() ** 2).sum())
            err += float(((got.double() - ref.double()) ** 2).sum())
    snr = 10.0 * torch.log10(torch.tensor(sig / max(err, 1e-30))).item()
    return ConfigScore(snr, config_bits(denoiser.model, config, cache), probe.score(q) if probe is not None else None)


def mean_psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [-1, 1], on [0, 1], capped at 100 dB: eval's
    definition (the pipeline room may not import eval), so the probe and the report agree."""
    mse = ((x.float() - ref.float()) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).clamp(max=100).mean())


@dataclass
class SampleProbe:
    """Fixed prompts and seeds sampled with the calibration schedule, the FP images kept: a
    configuration scores the mean PSNR of its images against them. Built from the calibration
    set's own seed (its first ``n`` samples), so no evaluation seed is ever looked at."""

    batch: PromptBatch
    sampler: SamplerConfig
    reference: torch.Tensor

    @classmethod
    def build(cls, denoiser: Denoiser, calib: CalibSet, n: int) -> SampleProbe:
        c = calib.config
        guidance = c.guidance if c.guidance is not None else denoiser.family.default_guidance
        probe = cls(
            prompt_batch(denoiser, n, c.seed),
            SamplerConfig(steps=c.steps, guidance=guidance, batch_size=n),
            torch.empty(0),
        )
        probe.reference = probe.images(denoiser)
        return probe

    def images(self, model: Denoiser) -> torch.Tensor:
        """``model``'s images from the probe's seeds (latent models decoded)."""
        lat = sample(lambda named: model(**named), model, self.batch, self.sampler, progress=False)
        return model.to_images(lat)

    def score(self, model: Denoiser) -> float:
        return mean_psnr(self.images(model), self.reference)


OP_TYPES: list[tuple[str, tuple[str, ...]]] = [  # first match wins; patterns are substrings of the layer name
    ("time embedding", ("time_embedding", "timestep_embedder", "time_emb_proj", "time_text_embed")),
    ("adaLN", ("norm1.linear", "norm1_context.linear", "adaLN", "norm.linear")),
    ("caption embedding", ("add_embedding", "context_embedder", "caption_projection", "text_embedder")),
    ("patchify", ("pos_embed.proj", "x_embedder", "patch_embed")),
    ("cross-attention", ("attn2.",)),
    ("attention Q/K/V", ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")),
    ("attention out", ("to_out", "to_add_out")),
    ("FF", ("ff.", "ff_context.")),
    ("transformer proj in/out", ("proj_in", "attentions.")),
    ("conv (resample)", ("downsamplers", "upsamplers")),
    ("conv (ResBlock)", ("resnets",)),
]
FINAL = ("conv_out", "proj_out", "proj_out_1", "proj_out_2", "norm_out.linear")
FIRST = ("conv_in",)


def op_type(layer: str) -> str:
    """The operation type a layer's importance is aggregated under (Qua2SeDiMo's findings are
    stated per type: time embedding, final projection, attention, ResBlock convs, ...)."""
    if layer in FINAL:
        return "final projection"
    if layer in FIRST:
        return "patchify"
    return next((t for t, pats in OP_TYPES if any(p in layer for p in pats)), "other")


def block_of(layer: str) -> str:
    """The block a layer belongs to (``down_blocks.1``, ``mid_block``, ``transformer_blocks.3``),
    or ``stem`` / ``head`` for what runs before / after them."""
    parts = layer.split(".")
    for i, p in enumerate(parts):
        if p in ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks") and i + 1 < len(parts):
            return f"{p}.{parts[i + 1]}"
        if p == "mid_block":
            return p
    return "head" if layer in FINAL or layer.startswith("norm_out") else "stem"


def layer_importance(effects: dict[str, dict[str, float]]) -> dict[str, float]:
    """A layer's importance: how far the predicted score moves between its best and worst option."""
    return {n: max(e.values()) - min(e.values()) for n, e in effects.items()}
