"""Model loading: bare denoiser folders, a hub id offline, bad folders."""

import json

import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.models.loading import load_denoiser
from diffquant.zoo.builtin import scheduler_config
from tests.conftest import make_tiny_dit, make_tiny_unet


def test_bare_denoiser_folders(tmp_path):
    # a bare DiT (class labels, no text encoder) loads with its pipeline's ../scheduler
    d = make_tiny_dit()
    d.model.save_pretrained(tmp_path / "p" / "transformer")
    with pytest.raises(DiffquantError, match="scheduler_config.json"):
        load_denoiser(str(tmp_path / "p" / "transformer"))  # never a silent fallback schedule
    (tmp_path / "p" / "scheduler").mkdir()
    (tmp_path / "p" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **scheduler_config()})
    )
    back = load_denoiser(str(tmp_path / "p" / "transformer"))
    assert back.family.name == "dit" and back.scheduler["beta_schedule"] == "squaredcos_cap_v2"
    with torch.no_grad():
        inp = back.example_inputs(2)
        assert torch.allclose(back(**inp), d(**inp))
    # a bare SD UNet needs its pipeline's text encoders
    make_tiny_unet().model.save_pretrained(tmp_path / "u")
    with pytest.raises(DiffquantError, match="model_index.json"):
        load_denoiser(str(tmp_path / "u"))
    (tmp_path / "p" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "LCMScheduler"}))
    with pytest.raises(DiffquantError, match="LCMScheduler.*not supported"):
        load_denoiser(str(tmp_path / "p" / "transformer"))


def test_hub_id_offline_says_download_first(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DiffquantError, match="download"):
        load_denoiser("some-org/some-model")


def test_bad_folders(tmp_path):
    with pytest.raises(DiffquantError, match="no model_index.json or config.json"):
        load_denoiser(str(tmp_path))
    (tmp_path / "config.json").write_text('{"_class_name": "VQModel"}')
    with pytest.raises(DiffquantError, match="not supported"):
        load_denoiser(str(tmp_path))
    with pytest.raises(DiffquantError, match="not found"):
        load_denoiser(str(tmp_path / "nope"))
    with pytest.raises(DiffquantError, match="unknown builtin"):
        load_denoiser("builtin:digits-xl")


def test_corrupt_weights_in_folder(tmp_path):
    d = make_tiny_unet()
    d.model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DiffquantError, match="could not load"):
        load_denoiser(str(tmp_path / "m"))
