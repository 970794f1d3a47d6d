"""Seeded training of the builtin digits models (`diffquant zoo train NAME`).

Denoisers: epsilon-prediction DDPM loss on the cosine schedule, AdamW with cosine decay, an EMA
of the weights (what ships), and 10 % condition dropout so classifier-free guidance works.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from diffquant._io import atomic_path, write_json
from diffquant.errors import DiffquantError
from diffquant.zoo.builtin import (
    BUILTIN_MODELS,
    PromptTable,
    build_classifier,
    build_denoiser_module,
    scheduler_config,
    weights_dir,
)
from diffquant.zoo.data import CLASS_WORDS, load_digits_tensor

__all__ = ["TrainConfig", "cosine_lr", "default_train_config", "ema_step", "train_builtin"]


@dataclass
class TrainConfig:
    """Training settings of one builtin model; saved verbatim in its model card."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.995
    cond_dropout: float = 0.1
    seed: int = 0
    threads: int = 0  # 0: leave torch's default


def default_train_config(name: str) -> TrainConfig:
    """Settings that reach the card's metrics on 2 CPU cores in well under an hour."""
    if name == "digits-sd":
        return TrainConfig(steps=2000, batch_size=48)
    if name == "digits-dit":
        return TrainConfig(steps=3000, batch_size=128, lr=1e-3)
    if name == "digits-classifier":
        return TrainConfig(steps=1500, batch_size=128, lr=1e-3, ema_decay=0.0, cond_dropout=0.0)
    raise DiffquantError(f"unknown builtin model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def ema_step(pairs: list[tuple[torch.nn.Module, torch.nn.Module]], step: int, max_decay: float) -> None:
    """Move each EMA module towards its live one: decay min(max_decay, (1 + step) / (10 + step))."""
    decay = min(max_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema, live in pairs:
            for pe, pm in zip(ema.parameters(), live.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (classifier only) so it generalizes to samples."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def _train_classifier(cfg: TrainConfig, gen: torch.Generator, bar: tqdm) -> tuple[dict, float]:
    x, y = load_digits_tensor()
    model = build_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss = torch.tensor(0.0)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    state = {f"classifier.{k}": v for k, v in model.state_dict().items()}
    return state, {"final_loss": float(loss.item()), "train_accuracy": acc}


def _train_denoiser(name: str, cfg: TrainConfig, gen: torch.Generator, bar: tqdm) -> tuple[dict, dict]:
    from diffusers import DDPMScheduler

    x, y = load_digits_tensor()
    sched = DDPMScheduler(**scheduler_config())
    alphas = sched.alphas_cumprod.float()
    model = build_denoiser_module(name)
    prompts = PromptTable() if name == "digits-sd" else None
    params = list(model.parameters()) + (list(prompts.parameters()) if prompts is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(model).eval()
    ema_prompts = copy.deepcopy(prompts) if prompts is not None else None
    null_id = len(CLASS_WORDS)
    losses: list[float] = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        x0, labels = x[idx], y[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < cfg.cond_dropout
        labels[drop] = null_id
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if prompts is not None:
            pred = model(xt, t, encoder_hidden_states=prompts(labels)).sample
        else:
            # Our seeded dropout (null id = 10) conditions every block. Only block 0's diffusers
            # LabelEmbedding dropout is switched off; blocks 1-3 keep diffusers' own 10 %
            # train-time label drop, which the shipped digits-dit weights were trained with
            # (kept so `zoo train` reproduces them; it acts as extra per-block CFG dropout).
            model.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob = 0.0
            pred = model(xt, timestep=t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_step([(ema, model)] + ([(ema_prompts, prompts)] if prompts is not None else []), step, cfg.ema_decay)
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    state = {f"denoiser.{k}": v.contiguous() for k, v in ema.state_dict().items()}
    if ema_prompts is not None:
        state["prompts.table"] = ema_prompts.table.detach().contiguous()
    tail = losses[-200:]
    return state, {"final_loss": sum(tail) / len(tail)}


def train_builtin(name: str, cfg: TrainConfig | None = None, out_dir: str | Path | None = None) -> Path:
    """Train builtin model ``name`` and write `<name>.safetensors` and `<name>.json` atomically.

    Returns the weights path. FP benchmark metrics are added to the card by the caller
    (`diffquant zoo train` evaluates the model after training).
    """
    cfg = cfg or default_train_config(name)
    if name not in BUILTIN_MODELS:
        raise DiffquantError(f"unknown builtin model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    out = Path(out_dir) if out_dir else weights_dir()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    with tqdm(total=cfg.steps, desc=f"train {name}", unit="step") as bar:
        if name == "digits-classifier":
            state, stats = _train_classifier(cfg, gen, bar)
        else:
            state, stats = _train_denoiser(name, cfg, gen, bar)
    weights = out / f"{name}.safetensors"
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"name": name})
    card = {
        "name": name,
        "train_config": dataclasses.asdict(cfg),
        "scheduler": scheduler_config() if name != "digits-classifier" else None,
        "train_seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
        **stats,
    }
    write_json(out / f"{name}.json", card)
    return weights
