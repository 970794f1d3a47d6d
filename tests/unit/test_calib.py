"""Calibration data: shards + index, reload, cache by settings hash, NaN/Inf rejected."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffquant.calib_data import CalibConfig, collect, load_calib
from diffquant.calib_data.collect import pick_steps
from diffquant.errors import DiffquantError
from tests.conftest import make_tiny_unet


def test_pick_steps_evenly_spaced():
    assert pick_steps(25, 5) == [0, 6, 12, 18, 24]
    assert pick_steps(10, 10) == list(range(10))
    assert pick_steps(10, 1) == [9]


def test_collect_store_reload_and_cache(tmp_path):
    d = make_tiny_unet()
    cfg = CalibConfig(samples=3, steps=5, timesteps=3, guidance=2.0)
    cs = collect(d, cfg, cache_dir=tmp_path, progress=False)
    index = json.loads((cs.folder / "index.json").read_text())
    assert [s["step"] for s in index["shards"]] == [0, 2, 4]
    assert len(cs.timesteps) == 3 and len(cs) == 3 * 3 * 2  # cond + uncond copies
    inp = cs.at(cs.timesteps[0], 6)
    assert inp["sample"].shape == (6, 1, 8, 8) and inp["encoder_hidden_states"].shape == (6, 3, 16)
    assert torch.all(inp["timestep"] == cs.timesteps[0])
    # second half of every batch is the unconditional (null prompt) copy
    assert torch.equal(inp["encoder_hidden_states"][3:], d.encode(torch.full((3,), d.null_id))["encoder_hidden_states"])
    again = collect(d, cfg, cache_dir=tmp_path, progress=False)
    assert again.folder == cs.folder  # served from cache
    assert torch.equal(again.at(cs.timesteps[0], 6)["sample"], inp["sample"])
    other = collect(d, CalibConfig(samples=3, steps=5, timesteps=2, guidance=2.0), cache_dir=tmp_path, progress=False)
    assert other.folder != cs.folder
    # no temp folders left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nan_in_shard_is_a_clear_error(tmp_path):
    d = make_tiny_unet()
    cs = collect(d, CalibConfig(samples=2, steps=3, timesteps=2), cache_dir=tmp_path, progress=False)
    shard = sorted(cs.folder.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    tensors["sample"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(shard))
    with pytest.raises(DiffquantError, match=r"NaN/Inf.*'sample'"):
        load_calib(cs.folder)


def test_missing_or_corrupt_folder(tmp_path):
    with pytest.raises(DiffquantError, match="index.json is missing"):
        load_calib(tmp_path)
    (tmp_path / "index.json").write_text("[")
    with pytest.raises(DiffquantError, match="not valid JSON.*collect again"):
        load_calib(tmp_path)
