"""Model loading: a local diffusers folder, a hub id offline, bad folders."""

import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.models.loading import load_denoiser
from tests.conftest import make_tiny_dit, make_tiny_unet


@pytest.mark.parametrize("make", [make_tiny_unet, make_tiny_dit], ids=["unet", "dit"])
def test_local_diffusers_folder(make, tmp_path):
    d = make()
    d.model.save_pretrained(tmp_path / "m")
    back = load_denoiser(str(tmp_path / "m"))
    assert back.family == d.family
    x, t, c = d.example_inputs(2)
    with torch.no_grad():
        assert torch.allclose(back(x, t, c), d(x, t, c))
    assert "conv_in" in back.skip or "pos_embed.*" in back.skip


def test_hub_id_offline_says_download_first(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DiffquantError, match="download"):
        load_denoiser("some-org/some-model")


def test_bad_folders(tmp_path):
    with pytest.raises(DiffquantError, match="no config.json"):
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
