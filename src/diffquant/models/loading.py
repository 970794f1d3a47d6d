"""Loading a denoiser: ``builtin:NAME``, a diffusers pipeline folder (``model_index.json``: the
denoiser, tokenizers, text encoders, VAE and scheduler read as a whole), a bare denoiser folder,
or a hub id (local cache only; nothing is ever downloaded)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffquant._check import read_json
from diffquant.errors import DiffquantError
from diffquant.models.denoiser import Denoiser
from diffquant.models.families import DigitsDiT, DigitsLDM, DigitsSD, family_for, supported_classes
from diffquant.zoo.builtin import PromptTable, build_classifier, build_denoiser_module, scheduler_config, weights_dir
from diffquant.zoo.data import CLASS_WORDS

__all__ = [
    "DDIM_SCHEDULERS",
    "FLOW_SCHEDULERS",
    "LoadConfig",
    "default_prompts",
    "load_classifier",
    "load_denoiser",
    "load_pipeline",
    "read_prompts",
]

DENOISER_FOLDERS = ("unet", "transformer")
# schedulers whose config is a discrete beta schedule: sampled with DDIM on that schedule
DDIM_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
    "DEISMultistepScheduler",
    "KDPM2DiscreteScheduler",
)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
MAX_PROMPT_CHARS = 2000


@dataclass
class LoadConfig:
    """How to read a pipeline: the prompts to encode (None: the family's default list) and the
    image size in pixels (None: the pipeline's default)."""

    prompts: list[str] | None = None
    resolution: tuple[int, int] | None = None


def default_prompts() -> list[str]:
    """The ~128 varied prompts the project ships for text-to-image calibration."""
    return read_prompts(Path(str(resources.files("diffquant.models") / "prompts.txt")))


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of ``path``; an empty or unreadable file is an error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DiffquantError(
            f"prompts file {path} is unreadable ({e}); give a UTF-8 text file, one prompt per line"
        ) from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise DiffquantError(f"prompts file {path} holds no prompt; write one prompt per line")
    long = [p for p in prompts if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise DiffquantError(
            f"prompts file {path}: a line of {len(long[0])} characters is not a prompt (limit {MAX_PROMPT_CHARS}); is "
            "it the right file?"
        )
    return prompts


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise DiffquantError(f"weights file {path} is missing; for builtin models run `diffquant zoo train NAME`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DiffquantError(f"{path} is not a readable safetensors file ({e}); re-download or retrain it") from None


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _builtin(name: str) -> Denoiser:
    state = _read_safetensors(weights_dir() / f"{name}.safetensors")
    module = build_denoiser_module(name)
    module.load_state_dict(_sub(state, "denoiser."))
    module.eval()
    if name == "digits-sd":
        table = PromptTable()
        table.load_state_dict({"table": state["prompts.table"]})
        family = DigitsSD(module)
        cond = family.encode(table.eval(), list(CLASS_WORDS))
    else:
        family = DigitsDiT(module)
        cond = family.encode(None, [str(i) for i in range(len(CLASS_WORDS))])
    return Denoiser(f"builtin:{name}", family, module, scheduler_config(), cond, list(CLASS_WORDS))


def _builtin_ldm(cfg: LoadConfig) -> Denoiser:
    """digits-ldm, a saved StableDiffusionPipeline; prompts default to one per class in class
    order (``--prompts`` may hold other phrasings, e.g. the calibration templates)."""
    from diffquant.zoo.ldm import ldm_prompts

    folder = weights_dir() / "digits-ldm"
    if not (folder / "model_index.json").exists():
        raise DiffquantError(
            f"builtin model digits-ldm is not trained ({folder} is missing); run `diffquant zoo train digits-ldm`"
        )
    if cfg.resolution:
        raise DiffquantError("builtin:digits-ldm draws 32x32 images; --resolution is for pipeline folders")
    return _from_pipeline(folder, LoadConfig(prompts=cfg.prompts or ldm_prompts()), DigitsLDM, "builtin:digits-ldm")


def _json(path: Path) -> dict:
    return read_json(path, "a diffusers folder's config files are JSON objects (save it again with save_pretrained)")


def _scheduler(folder: Path, denoiser_dir: str) -> dict:
    """The pipeline's scheduler config (``folder/scheduler``), of a type diffquant samples with."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.exists():
        raise DiffquantError(
            f"{folder} has no scheduler/scheduler_config.json: diffquant samples with the pipeline's own schedule and "
            "never "
            "guesses one; pass the pipeline folder (with model_index.json), or copy its scheduler/ folder beside "
            f"{denoiser_dir}"
        )
    cfg = _json(path)
    cls = cfg.get("_class_name", "")
    if cls not in DDIM_SCHEDULERS + FLOW_SCHEDULERS:
        raise DiffquantError(
            f"{path}: scheduler {cls!r} is not supported; supported: {', '.join(DDIM_SCHEDULERS + FLOW_SCHEDULERS)}"
        )
    return {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}


def _check_weights(folder: Path) -> None:
    """Safetensors preferred; a folder with only ``.bin`` weights loads (diffusers and transformers
    read them with ``weights_only=True``) after a warning."""
    bins = [p for p in folder.rglob("*.bin") if not p.name.startswith("training_args")]
    if bins and not list(folder.rglob("*.safetensors")):
        warnings.warn(
            f"{folder} holds only .bin weights; they are loaded with weights_only=True, but convert them to "
            "safetensors",
            stacklevel=3,
        )


def load_pipeline(folder: Path):
    """The diffusers pipeline saved in ``folder`` (FP32, local files only), its parts checked."""
    import diffusers

    index = _json(folder / "model_index.json")
    name = index.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise DiffquantError(
            f"{folder / 'model_index.json'}: pipeline class {name!r} is not in diffusers {diffusers.__version__}"
        )
    for part in (
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "vae",
        "unet",
        "transformer",
        "scheduler",
    ):
        entry = index.get(part)
        if isinstance(entry, list) and entry[0] is not None and not (folder / part).is_dir():
            raise DiffquantError(
                f"{folder / 'model_index.json'} names {part} ({entry[1]}), but {folder / part} is missing; save the "
                "whole pipeline again with save_pretrained"
            )
    _check_weights(folder)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError, ImportError, AttributeError) as e:
        raise DiffquantError(f"could not load the pipeline in {folder}: {str(e).splitlines()[0]}") from None


def _truncation_warning(pipe, prompts: list[str]) -> None:
    tok = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tok is None:
        return
    limit = tok.model_max_length
    long = sum(1 for p in prompts if len(tok(p).input_ids) > limit)
    if long:
        warnings.warn(
            f"{long} prompt(s) are longer than the tokenizer's {limit} tokens and were truncated, as the pipeline does",
            stacklevel=3,
        )


def _from_pipeline(folder: Path, cfg: LoadConfig, family_cls=None, name: str = "") -> Denoiser:
    pipe = load_pipeline(folder)
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise DiffquantError(f"{folder}: the pipeline has no unet or transformer to quantize")
    family = (
        family_cls(model.eval(), pipe, cfg.resolution) if family_cls else family_for(model.eval(), pipe, cfg.resolution)
    )
    sched = _scheduler(folder, folder.name)
    if (family.sampler == "flow") != (sched["_class_name"] in FLOW_SCHEDULERS):
        raise DiffquantError(
            f"{folder}: a {family.name} model with a {sched['_class_name']}; expected a "
            f"{'flow-matching' if family.sampler == 'flow' else 'discrete'} scheduler"
        )
    prompts = cfg.prompts or family.default_prompts() or default_prompts()
    needs = [s.name for s in family.input_specs() if s.role == "cond" and s.name != "class_labels"]
    if needs:
        for part in ("tokenizer", "text_encoder"):
            if getattr(pipe, part, None) is None and getattr(pipe, f"{part}_2", None) is None:
                raise DiffquantError(
                    f"{folder}: the {family.name} pipeline needs its {part}, which the folder lacks; save the whole "
                    "pipeline with save_pretrained"
                )
        _truncation_warning(pipe, prompts)
    with torch.no_grad():
        cond = family.encode(pipe, prompts)
    text = family.text_plan(pipe)
    parts = {n: getattr(pipe, n) for e in (text.encoders if text else []) for n in (e.component, e.tokenizer)}
    return Denoiser(
        name or str(folder),
        family,
        model,
        sched,
        cond,
        prompts,
        vae=getattr(pipe, "vae", None),
        text=(text, parts) if text else None,
    )


def _from_component(folder: Path, cfg: LoadConfig) -> Denoiser:
    """A bare denoiser folder (``unet/`` of a pipeline, or a saved model): only families that need
    no text encoder load this way; the scheduler comes from ``../scheduler``."""
    import diffusers

    cls_name = _json(folder / "config.json").get("_class_name", "")
    if cls_name not in supported_classes():
        raise DiffquantError(
            f"{folder / 'config.json'}: model class {cls_name!r} is not supported; supported: "
            f"{', '.join(supported_classes())}"
        )
    _check_weights(folder)
    try:
        model = getattr(diffusers, cls_name).from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise DiffquantError(f"could not load the model in {folder}: {str(e).splitlines()[0]}") from None
    family = family_for(model.eval(), None, cfg.resolution)
    if any(s.role == "cond" and s.name != "class_labels" for s in family.input_specs()):
        raise DiffquantError(
            f"{folder} is a bare {cls_name}: a {family.name} model is conditioned on its pipeline's text encoders, "
            "which are not "
            f"here; pass the pipeline folder (the one with model_index.json)"
        )
    sched = _scheduler(folder.parent, folder.name)
    prompts = cfg.prompts or family.default_prompts() or [""]
    return Denoiser(str(folder), family, model, sched, family.encode(None, prompts), prompts)


def _from_hub(repo_id: str, cfg: LoadConfig) -> Denoiser:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise DiffquantError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache and diffquant never downloads at run "
            f"time: on a connected machine run `huggingface-cli download {repo_id}` (or save_pretrained it to a "
            f"folder) and pass that folder. ({type(e).__name__})"
        ) from None
    return _from_folder(Path(folder), cfg)


def _from_folder(path: Path, cfg: LoadConfig) -> Denoiser:
    if (path / "model_index.json").exists():
        return _from_pipeline(path, cfg)
    if (path / "config.json").exists():
        return _from_component(path, cfg)
    for sub in DENOISER_FOLDERS:
        if (path / sub / "config.json").exists():
            return _from_component(path / sub, cfg)
    raise DiffquantError(
        f"{path} is not a diffusers model folder: no model_index.json or config.json (save it with save_pretrained)"
    )


def load_denoiser(spec: str, cfg: LoadConfig | None = None) -> Denoiser:
    """Load ``builtin:NAME``, a diffusers pipeline or model folder, or a hub id (cache only)."""
    cfg = cfg or LoadConfig()
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name == "digits-ldm":
            return _builtin_ldm(cfg)
        if name not in ("digits-sd", "digits-dit"):
            raise DiffquantError(
                f"unknown builtin denoiser {name!r}; choose builtin:digits-sd, builtin:digits-dit or builtin:digits-ldm"
            )
        if cfg.prompts or cfg.resolution:
            raise DiffquantError(
                f"{spec} has fixed class-word prompts and a 16x16 size; --prompts and --resolution are for pipeline "
                "folders"
            )
        return _builtin(name)
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise DiffquantError(f"{path} is a file; pass a diffusers pipeline folder (with model_index.json)")
        return _from_folder(path, cfg)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _from_hub(spec, cfg)
    raise DiffquantError(
        f"model {spec!r} not found: pass builtin:digits-sd, builtin:digits-dit, builtin:digits-ldm, a folder, or a "
        "hub id"
    )


def load_classifier():
    """The builtin digits classifier (for metrics), in eval mode."""
    state = _read_safetensors(weights_dir() / "digits-classifier.safetensors")
    clf = build_classifier()
    clf.load_state_dict(_sub(state, "classifier."))
    return clf.eval()
