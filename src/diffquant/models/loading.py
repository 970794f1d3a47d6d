"""Loading a denoiser: ``builtin:NAME``, a local diffusers folder, or a hub id (cache only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffquant.errors import DiffquantError
from diffquant.models.builtin import (
    PROMPT_DIM,
    PROMPT_TOKENS,
    PromptTable,
    build_classifier,
    build_denoiser_module,
    scheduler_config,
    weights_dir,
)
from diffquant.models.data import CLASS_WORDS
from diffquant.models.denoiser import DIT_SKIP, UNET_SKIP, Denoiser

__all__ = ["load_classifier", "load_denoiser"]

SUPPORTED = {"UNet2DConditionModel": "unet", "DiTTransformer2DModel": "dit"}


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
    family = "unet" if name == "digits-sd" else "dit"
    prompts = None
    if family == "unet":
        prompts = PromptTable()
        prompts.load_state_dict({"table": state["prompts.table"]})
        prompts.eval()
    return Denoiser(
        name=f"builtin:{name}",
        family=family,
        model=module,
        scheduler=scheduler_config(),
        prompts=prompts,
        words=CLASS_WORDS,
        null_id=len(CLASS_WORDS),
        cond_shape=(PROMPT_TOKENS, PROMPT_DIM) if family == "unet" else (),
        skip=UNET_SKIP if family == "unet" else DIT_SKIP,
    )


def _wrap_diffusers(module, name: str, folder: Path | None) -> Denoiser:
    family = SUPPORTED[type(module).__name__]
    sched = scheduler_config()
    if folder is not None:
        for cand in (folder / "scheduler" / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
            if cand.exists():
                sched = {k: v for k, v in json.loads(cand.read_text()).items() if not k.startswith("_")}
                break
    cfg = module.config
    if family == "unet":
        null_id, cond_shape = 10, (PROMPT_TOKENS, cfg.cross_attention_dim)
    else:
        null_id, cond_shape = cfg.num_embeds_ada_norm, ()
    return Denoiser(
        name=name,
        family=family,
        model=module.eval(),
        scheduler=sched,
        null_id=null_id,
        cond_shape=cond_shape,
        skip=UNET_SKIP if family == "unet" else DIT_SKIP,
    )


def _class_of(folder: Path) -> str:
    cfg = folder / "config.json"
    if not cfg.exists():
        raise DiffquantError(f"{folder} is not a diffusers model folder: no config.json (save it with save_pretrained)")
    try:
        cls = json.loads(cfg.read_text()).get("_class_name", "")
    except json.JSONDecodeError as e:
        raise DiffquantError(f"{cfg} is not valid JSON ({e})") from None
    if cls not in SUPPORTED:
        raise DiffquantError(f"{cfg}: model class {cls!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return cls


def _from_folder(folder: Path) -> Denoiser:
    import diffusers

    if (folder / "unet" / "config.json").exists() and not (folder / "config.json").exists():
        folder = folder / "unet"
    elif (folder / "transformer" / "config.json").exists() and not (folder / "config.json").exists():
        folder = folder / "transformer"
    cls = getattr(diffusers, _class_of(folder))
    try:
        module = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise DiffquantError(f"could not load the model in {folder}: {str(e).splitlines()[0]}") from None
    return _wrap_diffusers(module, str(folder), folder)


def _from_hub(repo_id: str) -> Denoiser:
    import diffusers

    last: Exception | None = None
    for cls_name, sub in (("UNet2DConditionModel", "unet"), ("DiTTransformer2DModel", "transformer")):
        try:
            module = getattr(diffusers, cls_name).from_pretrained(repo_id, subfolder=sub, local_files_only=True)
            return _wrap_diffusers(module, repo_id, None)
        except (OSError, ValueError) as e:
            last = e
    raise DiffquantError(
        f"hub model {repo_id!r} is not in the local Hugging Face cache and diffquant never downloads at run "
        f"time: on a connected machine run `huggingface-cli download {repo_id}` (or save_pretrained it to a "
        f"folder) and pass that folder. ({type(last).__name__})"
    )


def load_denoiser(spec: str) -> Denoiser:
    """Load ``builtin:NAME``, a local diffusers folder, or a hub id (``org/name``, cache only)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in ("digits-sd", "digits-dit"):
            raise DiffquantError(f"unknown builtin denoiser {name!r}; choose builtin:digits-sd or builtin:digits-dit")
        return _builtin(name)
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise DiffquantError(f"{path} is a file; pass a diffusers model folder (with config.json)")
        return _from_folder(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _from_hub(spec)
    raise DiffquantError(f"model {spec!r} not found: pass builtin:digits-sd, builtin:digits-dit, a folder, or a hub id")


def load_classifier():
    """The builtin digits classifier (for metrics), in eval mode."""
    state = _read_safetensors(weights_dir() / "digits-classifier.safetensors")
    clf = build_classifier()
    clf.load_state_dict(_sub(state, "classifier."))
    return clf.eval()
