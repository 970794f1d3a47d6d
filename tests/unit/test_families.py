"""Every diffusers family end to end on a tiny random-weight pipeline folder: load, calibrate from
prompts, quantize, export both targets, lint, parity; and the exported FP graph, fed the exact
tensors the diffusers pipeline feeds its denoiser in a real pipeline call, matches the denoiser."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch

from diffquant.calib_data import CalibConfig, collect
from diffquant.engines import OrtEngine
from diffquant.errors import DiffquantError
from diffquant.eval import check_parity
from diffquant.exporters import export, fp_onnx_proto, lint
from diffquant.models.loading import LoadConfig, load_denoiser
from diffquant.passes import load_recipe, quantize
from diffquant.quant import apply_plan
from tests.pipelines import FAMILIES, make_pipeline

PROMPTS = {"dit": ["1", "7"], "ddpm": None}
RESOLUTION = {"flux": (32, 32)}
CALL = {  # one real pipeline call per family, 2 steps
    "flux": dict(prompt="a red cat", height=32, width=32, max_sequence_length=512, output_type="latent"),
    "dit": dict(class_labels=[1], output_type="np"),
    "ddpm": dict(batch_size=1, output_type="np"),
    "pixart": dict(prompt="a red cat", height=16, width=16, use_resolution_binning=False, output_type="latent"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {f: make_pipeline(f, root / f) for f in FAMILIES}


def _load(folder, family):
    prompts = PROMPTS.get(family, ["a red cat", "a blue dog"])
    return load_denoiser(str(folder), LoadConfig(prompts=prompts, resolution=RESOLUTION.get(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantize_export_parity(family, folders, tmp_path):
    d = _load(folders[family], family)
    calib = collect(
        d,
        CalibConfig(samples=2, steps=3, timesteps=2, guidance=d.family.default_guidance),
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert set(calib.shards[calib.timesteps[0]]) == {s.name for s in d.input_specs()}
    plan = quantize(d, load_recipe("minmax"), calib, bits="w8a8", progress=False)
    assert plan.quantized_layers() and all(
        lp.name not in plan.layers for lp in plan.quantized_layers() if lp.name in d.skip
    )
    for target in ("tensorrt", "onnxruntime"):
        res = export(plan, d, tmp_path / target, target=target)
        model = onnx.load(str(res.qdq_onnx))
        assert [i.name for i in model.graph.input] == [s.name for s in d.input_specs()]
        assert lint(model).ok
        fq = copy.deepcopy(d)
        apply_plan(fq.model, plan, target=target)
        r = check_parity(fq, model, [(ts, calib.at(ts, 4)) for ts in calib.timesteps])
        assert r.weight_max_step_error == 0.0
        assert r.max_step_error <= 1.0, r.worst_tensors
        assert r.cosine_min > (0.999 if target == "onnxruntime" else 0.99)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp_graph_matches_what_the_pipeline_feeds(family, folders):
    import diffusers

    d = _load(folders[family], family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folders[family]), local_files_only=True)
    net = getattr(pipe, "unet", None) or pipe.transformer
    seen = []

    def hook(_m, args, kwargs, out):
        if not seen:
            seen.append(
                (
                    {**dict(zip(("sample_or_hidden", "timestep"), args)), **kwargs},
                    out[0] if isinstance(out, tuple) else out.sample,
                )
            )

    h = net.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(0),
                **CALL.get(family, dict(prompt="a red cat", output_type="latent")),
            )
    finally:
        h.remove()
    kwargs, ref = seen[0]
    flat = {**kwargs, **(kwargs.get("added_cond_kwargs") or {})}
    flat.setdefault(d.sample_name, flat.get("sample_or_hidden"))
    n = len(flat[d.sample_name])
    feeds = {}
    for s in d.input_specs():
        v = flat[s.name]
        if s.role in ("timestep", "guidance") and v.numel() == 1:  # pipelines pass a scalar timestep
            v = v.reshape(1).expand(n)
        feeds[s.name] = v.numpy().astype(s.dtype)
        if s.role == "cond":  # our prompt table holds exactly the rows the pipeline encoded
            table = d.conditioning[s.name].float().reshape(d.null_id + 1, -1)
            rows = torch.as_tensor(feeds[s.name]).float().reshape(n, -1)
            assert torch.cdist(rows, table).min(dim=1).values.max() < 1e-4, s.name
    got = OrtEngine(fp_onnx_proto(d)).run(feeds)["noise_pred"]
    ref = (
        d.family.split_learned_sigma(ref).numpy()
        if d.sample_name in ("hidden_states",) and ref.dim() == 4
        else ref.numpy()
    )
    snr = 10 * np.log10((ref**2).sum() / max(((got - ref) ** 2).sum(), 1e-30))
    assert snr >= 60, f"{family}: SNR {snr:.1f} dB"


def test_bad_pipeline_folders(folders, tmp_path):
    import shutil

    broken = tmp_path / "sd"
    shutil.copytree(folders["sd"], broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(DiffquantError, match="text_encoder.*missing"):
        load_denoiser(str(broken))
    (tmp_path / "empty.txt").write_text("\n \n")
    from diffquant.models.loading import read_prompts

    with pytest.raises(DiffquantError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(DiffquantError, match="multiple of"):
        load_denoiser(str(folders["flux"]), LoadConfig(prompts=["a"], resolution=(30, 30)))
