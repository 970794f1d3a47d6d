"""Shared fixtures: tiny random-weight diffusers denoisers built from small configs."""

from __future__ import annotations

import pytest
import torch

from diffquant.calib_data import CalibConfig, collect
from diffquant.models.denoiser import Denoiser
from diffquant.models.families import DiT, StableDiffusion
from diffquant.zoo.builtin import scheduler_config

WORDS = [str(i) for i in range(10)]


def make_tiny_unet(seed: int = 0) -> Denoiser:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    # ten seeded "prompt" embeddings of 3 tokens and the empty prompt (zeros) last
    gen = torch.Generator().manual_seed(1234)
    table = torch.randn(11, 3, 16, generator=gen)
    table[10] = 0
    return Denoiser("tiny-unet", StableDiffusion(m), m, scheduler_config(), {"encoder_hidden_states": table}, WORDS)


def make_tiny_dit(seed: int = 0) -> Denoiser:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()
    # adaLN-zero initializes the modulation to zero, which makes every block an identity;
    # give it random weights so the blocks (and their quantizers) do real work
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.normal_(0, 0.05)
    return Denoiser("tiny-dit", DiT(m), m, scheduler_config(), {"class_labels": torch.arange(11)}, WORDS)


@pytest.fixture(scope="session")
def tiny_unet() -> Denoiser:
    return make_tiny_unet()


@pytest.fixture(scope="session")
def tiny_dit() -> Denoiser:
    return make_tiny_dit()


@pytest.fixture(scope="session")
def calib_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("calib"))


def tiny_calib(denoiser: Denoiser, cache: str):
    return collect(
        denoiser, CalibConfig(samples=4, steps=6, timesteps=3, guidance=3.0), cache_dir=cache, progress=False
    )
