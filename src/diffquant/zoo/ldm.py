"""`digits-ldm`: a Stable-Diffusion-layout text-to-image pipeline trained by our own seeded code on
the digits, saved with `save_pretrained` so `StableDiffusionPipeline.from_pretrained` loads it.

Parts (all diffusers / transformers classes, built from configs): an `AutoencoderKL` on digits
upsampled to 32x32 (latents 4 x 8 x 8), a small `CLIPTextModel` with a CLIP BPE tokenizer whose
vocabulary holds the prompt words whole (other text falls back to characters), and a
`UNet2DConditionModel` with cross-attention on the latents, ε-prediction on the builtin cosine
schedule (DDIM). Two stages: the VAE (L1 + MSE + a small KL), then the UNet and the text encoder
together on the VAE's latents (scaled to unit variance), prompts drawn from templates x class
words, 10 % empty prompts for classifier-free guidance, EMA weights shipped.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffquant.zoo.data import CLASS_WORDS
from diffquant.zoo.train import cosine_lr, ema_step

__all__ = [
    "CALIB_TEMPLATES",
    "EVAL_TEMPLATE",
    "LDM_SIZE",
    "LdmTrainConfig",
    "build_ldm_parts",
    "ldm_prompts",
    "train_ldm",
]

LDM_SIZE = 32
EVAL_TEMPLATE = "a handwritten {}"  # the prompts quality is measured with: held out from calibration
CALIB_TEMPLATES = ("the digit {}", "number {}", "a drawing of a {}", "{} written by hand")
TRAIN_TEMPLATES = (EVAL_TEMPLATE, *CALIB_TEMPLATES, "{}", "the number {}", "a {}")
TEXT_LENGTH = 16  # tokens per prompt (the longest template is 8 words)


def ldm_prompts(template: str = EVAL_TEMPLATE) -> list[str]:
    """One prompt per class, in class order (prompt id = class, as the digits metrics expect)."""
    return [template.format(w) for w in CLASS_WORDS]


def _words() -> list[str]:
    words = {w for t in TRAIN_TEMPLATES for w in t.replace("{}", "").split()} | set(CLASS_WORDS)
    return sorted(words)


def write_tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose merges spell every prompt word as one token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in _words():
        parts = [*w[:-1], w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TEXT_LENGTH)


def build_ldm_parts(vocab_size: int) -> dict:
    """The untrained modules: vae, text_encoder, unet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=LDM_SIZE,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=vocab_size,
            max_position_embeddings=TEXT_LENGTH,
            projection_dim=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=LDM_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return {"vae": vae, "text_encoder": text, "unet": unet}


@dataclass
class LdmTrainConfig:
    """Both training stages; saved verbatim in the model card."""

    vae_steps: int = 1500
    vae_lr: float = 1e-3
    vae_batch_size: int = 32
    kl_weight: float = 1e-5
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    cond_dropout: float = 0.1
    seed: int = 0


def _train_vae(vae, x: torch.Tensor, cfg: LdmTrainConfig, gen: torch.Generator, bar) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    loss = torch.tensor(0.0)
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup_steps)
        batch = x[torch.randint(0, len(x), (cfg.vae_batch_size,), generator=gen)]
        post = vae.encode(batch).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, batch) + F.mse_loss(rec, batch) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(stage="vae", loss=f"{loss.item():.4f}")
    return float(loss.item())


def _encode_dataset(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every image, and the scaling factor (1 / std of the means)."""
    with torch.no_grad():
        posts = [vae.encode(x[i : i + 256]).latent_dist for i in range(0, len(x), 256)]
    mean, std = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
    return mean, std, float(1.0 / mean.std())


def _tokenize(tok, prompts: list[str]) -> torch.Tensor:
    return torch.tensor(tok(prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True).input_ids)


def _train_unet(parts: dict, tok, lat: tuple, y: torch.Tensor, cfg: LdmTrainConfig, gen: torch.Generator, bar) -> float:
    from diffusers import DDPMScheduler

    from diffquant.zoo.builtin import scheduler_config

    unet, text = parts["unet"], parts["text_encoder"]
    mean, std, scale = lat
    alphas = DDPMScheduler(**scheduler_config()).alphas_cumprod.float()
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    ema = {k: copy.deepcopy(m).eval() for k, m in (("unet", unet), ("text_encoder", text))}
    losses: list[float] = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        tmpl = torch.randint(0, len(TRAIN_TEMPLATES), (len(idx),), generator=gen).tolist()
        drop = (torch.rand(len(idx), generator=gen) < cfg.cond_dropout).tolist()
        prompts = ["" if d else TRAIN_TEMPLATES[t].format(CLASS_WORDS[int(c)]) for t, d, c in zip(tmpl, drop, y[idx])]
        t = torch.randint(0, len(alphas), (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(
            a.sqrt() * z0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=text(_tokenize(tok, prompts))[0]
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_step([(ema["unet"], unet), (ema["text_encoder"], text)], step, cfg.ema_decay)
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(stage="unet", loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    parts.update(ema)
    tail = losses[-200:]
    return sum(tail) / len(tail)


def train_ldm(out: str | Path, cfg: LdmTrainConfig | None = None) -> dict:
    """Train digits-ldm and save the pipeline folder ``out`` atomically; returns the model card
    (`diffquant zoo train` writes it beside the folder and adds the FP metrics)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffquant._io import atomic_folder
    from diffquant.zoo.builtin import scheduler_config
    from diffquant.zoo.data import load_digits_tensor

    cfg = cfg or LdmTrainConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = load_digits_tensor(LDM_SIZE)
    start = time.time()
    with atomic_folder(Path(out), "digits-ldm folder") as tmp:
        tok = write_tokenizer(tmp / ".tok")
        parts = build_ldm_parts(len(tok))
        with tqdm(total=cfg.vae_steps + cfg.steps, desc="train digits-ldm", unit="step") as bar:
            vae_loss = _train_vae(parts["vae"], x, cfg, gen, bar)
            parts["vae"].eval()
            lat = _encode_dataset(parts["vae"], x)
            parts["vae"].register_to_config(scaling_factor=lat[2])
            loss = _train_unet(parts, tok, lat, y, cfg, gen, bar)
        pipe = StableDiffusionPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"].eval(),
            tokenizer=tok,
            unet=parts["unet"].eval(),
            scheduler=DDIMScheduler(**scheduler_config()),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        for f in (tmp / ".tok").iterdir():
            f.unlink()
        (tmp / ".tok").rmdir()
    return {
        "name": "digits-ldm",
        "train_config": asdict(cfg),
        "scheduler": scheduler_config(),
        "train_seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
        "vae_final_loss": vae_loss,
        "final_loss": loss,
        "scaling_factor": lat[2],
        "eval_prompts": ldm_prompts(),
        "calib_templates": list(CALIB_TEMPLATES),
    }
