"""The pipeline parts around the denoiser, exported so that an engine folder is the whole pipeline:
every text encoder (its tokenizer as a `tokenizers` JSON file with the pipeline's padding and
truncation built in) and the VAE decoder (the encoder too, on request, for image-to-image).

They are not quantized. Each graph is FP32 for the onnxruntime target; for the tensorrt target
FP16 unless the part's FP32 activations on the calibration prompts come within half of FP16's
range (T5 is known to overflow), in which case it stays FP32 and the report says why. Each graph
is checked against torch by SNR, and each tokenizer file against the pipeline's tokenizer.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffquant._io import atomic_path
from diffquant.artifacts import TextEncoderEntry, TextEntry, VaeEntry
from diffquant.errors import DiffquantError
from diffquant.exporters.fp16 import upcast_float16
from diffquant.exporters.onnx_fp import module_onnx_proto, save_onnx
from diffquant.models.denoiser import Denoiser, decode_latents
from diffquant.models.families.text import TextEncoderSpec
from diffquant.targets import get_target

__all__ = ["FP16_SAFE", "PartReport", "PartsConfig", "export_parts", "snr_db", "tokenizer_json"]

FP16_SAFE = 65504.0 / 2  # an FP32 activation above this keeps its part in FP32
SNR_MIN_DB = {"float32": 60.0, "float16": 30.0}
CHECK_PROMPTS = 8


@dataclass
class PartsConfig:
    """Which parts to export: text encoders and VAE decoder (``parts``), the VAE encoder for
    image-to-image (``vae_encoder``), and the graphs' float type (``auto``: by target)."""

    parts: bool = True
    vae_encoder: bool = False
    float_dtype: str = "auto"


@dataclass
class PartReport:
    """One exported part: its file, float type and why, its SNR against torch per output, how
    the check ran (`_check_onnx`), and whether the tokenizer file encodes as the pipeline's."""

    name: str
    file: str
    dtype: str
    why: str
    max_abs_activation: float
    snr_db: dict[str, float] = field(default_factory=dict)
    checked: str = ""
    threshold_db: float = 0.0
    tokenizer_identical: bool | None = None

    @property
    def ok(self) -> bool:
        return self.tokenizer_identical is not False and all(v >= self.threshold_db for v in self.snr_db.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """10 log10(|ref|^2 / |out - ref|^2), capped at 200 dB (identical outputs)."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    err = float(np.sum((out - ref) ** 2))
    return 200.0 if err == 0 else min(200.0, 10 * math.log10(max(float(np.sum(ref**2)), 1e-30) / err))


class _TextGraph(nn.Module):
    """A text encoder with the outputs the composition reads, in the spec's order."""

    def __init__(self, encoder: nn.Module, spec: TextEncoderSpec) -> None:
        super().__init__()
        self.encoder, self.spec = encoder, spec

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        hidden = "penultimate" in self.spec.outputs
        out = self.encoder(
            input_ids,
            attention_mask=attention_mask if self.spec.feed_mask else None,
            output_hidden_states=hidden,
            return_dict=True,
        )
        pooled = getattr(out, "text_embeds", None)
        got = {
            "last_hidden_state": out.last_hidden_state,
            "penultimate": out.hidden_states[-2] if hidden else None,
            "pooled": pooled if pooled is not None else getattr(out, "pooler_output", None),
        }
        return tuple(got[o] for o in self.spec.outputs)


class _VaeDecodeGraph(nn.Module):
    def __init__(self, vae: nn.Module, family) -> None:
        super().__init__()
        self.vae, self.family = vae, family

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, self.family, latents)


class _VaeEncodeGraph(nn.Module):
    """Image in [-1, 1] -> the latent mean, scaled as the sampler's latents (image-to-image)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        mean = self.vae.encode(image, return_dict=False)[0].mean
        return (mean - (cfg.get("shift_factor", None) or 0.0)) * cfg.scaling_factor


def tokenizer_json(tok, spec: TextEncoderSpec) -> str:
    """The pipeline tokenizer as a `tokenizers` JSON string that pads and truncates to
    ``spec.max_length`` by itself (so the runtime needs no transformers)."""
    from tokenizers import Tokenizer

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DiffquantError(
            f"{spec.tokenizer}: {type(tok).__name__} has no `tokenizers` form to deploy; save the pipeline with a "
            "fast tokenizer (tokenizer.json)"
        )
    t = Tokenizer.from_str(backend.to_str())
    t.enable_truncation(spec.max_length)
    t.enable_padding(length=spec.max_length, pad_id=int(tok.pad_token_id), pad_token=str(tok.pad_token))
    return t.to_str()


def _max_abs(module: nn.Module, fn) -> float:
    """The largest |activation| of any submodule while ``fn()`` runs (FP32)."""
    peak = [0.0]

    def hook(_m, _a, out):
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel():
                peak[0] = max(peak[0], float(o.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return peak[0]


def _dtype(cfg: PartsConfig, target: str, peak: float) -> tuple[str, str]:
    if cfg.float_dtype != "auto":
        return cfg.float_dtype, "asked for"
    if not get_target(target).parts_fp16:
        return "float32", f"{target} target: FP32 graphs"
    if peak > FP16_SAFE:
        return (
            "float32",
            f"max |activation| {peak:.3g} on the calibration prompts is over half of FP16's 65504: kept FP32",
        )
    return "float16", f"max |activation| {peak:.3g}: fits FP16"


def _check_onnx(path: Path, feeds: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> tuple[dict[str, float], str]:
    """SNR of the graph's outputs against torch FP32, and how it ran: an FP16 graph whose ops
    lack FP16 CPU kernels in ONNX Runtime runs up-cast (its FP16 weights, FP32 arithmetic)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess, how = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), "as exported"
        outs = sess.run(list(refs), _typed(sess, feeds))
    except (Fail, OrtNotImplemented) as e:  # a kernel ONNX Runtime's CPU provider lacks for FP16
        if "float16" not in str(e) and "NOT_IMPLEMENTED" not in str(e):
            raise
        up = upcast_float16(onnx.load(str(path)))
        sess, how = (
            ort.InferenceSession(up.SerializeToString(), opts, providers=["CPUExecutionProvider"]),
            "FP16 weights, FP32 arithmetic (no FP16 CPU kernels)",
        )
        outs = sess.run(list(refs), _typed(sess, feeds))
    return {k: snr_db(refs[k], o) for k, o in zip(refs, outs)}, how


def _typed(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    types = {i.name: i.type for i in sess.get_inputs()}
    return {k: v.astype(np.float16) if types[k] == "tensor(float16)" else v for k, v in feeds.items() if k in types}


class _Exporter:
    """Writes the parts of one denoiser's pipeline into ``out`` and collects their reports."""

    def __init__(self, denoiser: Denoiser, out: Path, target: str, cfg: PartsConfig) -> None:
        self.d, self.out, self.target, self.cfg = denoiser, out, target, cfg
        self.reports: list[PartReport] = []

    def _write(
        self, name: str, module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], axes: dict, peak: float
    ) -> tuple[Path, str, str]:
        dtype, why = _dtype(self.cfg, self.target, peak)
        m = copy.deepcopy(module).eval()
        if dtype == "float16":
            m.half()
            args = tuple(a.half() if a.is_floating_point() else a for a in args)
        proto = module_onnx_proto(m, args, inputs, outputs, axes, name)
        proto.metadata_props.add(key="diffquant.float_dtype", value=dtype)
        path = save_onnx(proto, self.out / f"{name}.onnx")
        return path, dtype, why

    def text_encoder(self, spec: TextEncoderSpec) -> TextEncoderEntry:
        from tokenizers import Tokenizer

        tok = self.d.text_parts[spec.tokenizer]
        tok_file = Path("tokenizers") / spec.tokenizer / "tokenizer.json"
        (self.out / tok_file.parent).mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / tok_file) as tmp:
            tmp.write_text(tokenizer_json(tok, spec), encoding="utf-8")
        prompts = [p.lower().strip() if spec.lowercase else p for p in [*self.d.prompts[:CHECK_PROMPTS], ""]]
        enc = Tokenizer.from_file(str(self.out / tok_file)).encode_batch(prompts)
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        theirs = tok(prompts, padding="max_length", max_length=spec.max_length, truncation=True).input_ids
        graph = _TextGraph(self.d.text_parts[spec.component], spec).eval()
        args = (torch.from_numpy(ids), torch.from_numpy(mask)) if spec.feed_mask else (torch.from_numpy(ids),)
        inputs = ["input_ids", "attention_mask"][: len(args)]
        peak = _max_abs(graph, lambda: graph(*args))
        with torch.no_grad():
            refs = {o: v.numpy() for o, v in zip(spec.outputs, graph(*args))}
        axes = {**{i: {0: "batch"} for i in inputs}, **{o: {0: "batch"} for o in spec.outputs}}
        path, dtype, why = self._write(spec.component, graph, args, inputs, list(spec.outputs), axes, peak)
        snr, how = _check_onnx(path, dict(zip(inputs, (a.numpy() for a in args))), refs)
        self.reports.append(
            PartReport(
                spec.component,
                path.name,
                dtype,
                why,
                peak,
                snr,
                how,
                SNR_MIN_DB[dtype],
                ids.tolist() == [list(t) for t in theirs],
            )
        )
        return TextEncoderEntry(**spec.to_dict(), file=path.name, tokenizer_file=tok_file.as_posix(), dtype=dtype)

    def vae(self, *, encoder: bool) -> VaeEntry:
        vae, fam = self.d.vae, self.d.family
        gen = torch.Generator().manual_seed(0)
        if encoder:
            graph, name, inp, outp = _VaeEncodeGraph(vae).eval(), "vae_encoder", "image", "latents"
            x = torch.rand(2, vae.config.in_channels, *fam.resolution, generator=gen) * 2 - 1
        else:
            graph, name, inp, outp = _VaeDecodeGraph(vae, fam).eval(), "vae_decoder", "latents", "image"
            x = torch.randn(2, *self.d.sample_shape, generator=gen)
        peak = _max_abs(graph, lambda: graph(x))
        with torch.no_grad():
            ref = graph(x).numpy()
        path, dtype, why = self._write(name, graph, (x,), [inp], [outp], {inp: {0: "batch"}, outp: {0: "batch"}}, peak)
        snr, how = _check_onnx(path, {inp: x.numpy()}, {outp: ref})
        self.reports.append(PartReport(name, path.name, dtype, why, peak, snr, how, SNR_MIN_DB[dtype]))
        shape = [*ref.shape[1:]] if not encoder else list(x.shape[1:])
        return VaeEntry(file=path.name, input=inp, output=outp, dtype=dtype, shape=shape)


def export_parts(
    denoiser: Denoiser, out: Path, target: str, cfg: PartsConfig | None = None
) -> tuple[TextEntry | None, dict[str, VaeEntry] | None, list[PartReport]]:
    """Export the text encoders (with tokenizers) and the VAE decoder (and encoder on request) of
    ``denoiser``'s pipeline into ``out``; returns runtime.json's ``text`` and ``vae`` sections and
    one report per part. A denoiser without a pipeline (builtin digits, bare folders) has none."""
    cfg = cfg or PartsConfig()
    Path(out).mkdir(parents=True, exist_ok=True)
    ex = _Exporter(denoiser, Path(out), target, cfg)
    text = vae = None
    plan = denoiser.text_plan
    if cfg.parts and plan is not None:
        encoders = [ex.text_encoder(e) for e in plan.encoders]
        text = TextEntry(encoders=encoders, compose=plan.compose, unset_negative=plan.unset_negative)
    if cfg.parts and denoiser.vae is not None:
        vae = {"decoder": ex.vae(encoder=False), **({"encoder": ex.vae(encoder=True)} if cfg.vae_encoder else {})}
    return text, vae, ex.reports
