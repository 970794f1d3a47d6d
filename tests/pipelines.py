"""Tiny random-weight diffusers pipelines of every supported family, built from configs and saved
with `save_pretrained` (tokenizers from a small vocabulary written here; nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["BLOCK_TORCH", "FAMILIES", "export_minmax", "export_tiny", "make_pipeline", "start_server"]

FAMILIES = ("sd", "sd2-v", "sdxl", "pixart", "sd3", "flux", "dit", "ddpm")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
# `python -c BLOCK_TORCH <diffquant args>`: the CLI as a user without torch runs it (importing torch fails)
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
from diffquant.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _t5_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pieces = (
        [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
        + [(c, -3.0) for c in CHARS]
        + [("\u2581" + c, -2.5) for c in CHARS]
    )
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        extra_ids=0,
    )


def _clip(*, projection: bool = False, hidden: int = 32, proj: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=77,
        projection_dim=proj,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=64, relative_attention_num_buckets=8
        )
    ).eval()


def _vae(latent: int = 4, shift: float | None = None):
    from diffusers import AutoencoderKL

    # SD3 and Flux pipelines add the VAE's shift_factor when decoding (None breaks them)
    return AutoencoderKL(
        block_out_channels=(16, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=latent,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
        shift_factor=shift,
    ).eval()


def _unet(**kw):
    from diffusers import UNet2DConditionModel

    base = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    return UNet2DConditionModel(**{**base, **kw}).eval()


def _ddim(**kw):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **kw,
    )


def _randomize_zero_init(model) -> None:
    # adaLN-zero / zero-initialized output layers make random models identities; give them weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and p.dim() >= 1 and "bias" not in name:
                p.normal_(0, 0.05)


def _build(family: str, tmp: Path):
    import diffusers as d

    torch.manual_seed(0)
    if family in ("sd", "sd2-v"):
        sched = _ddim(prediction_type="v_prediction" if family == "sd2-v" else "epsilon")
        return d.StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_clip(),
            tokenizer=_clip_tokenizer(tmp / "tok"),
            unet=_unet(),
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        unet = _unet(
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            transformer_layers_per_block=1,
        )
        return d.StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=_clip(),
            text_encoder_2=_clip(projection=True),
            tokenizer=_clip_tokenizer(tmp / "t1"),
            tokenizer_2=_clip_tokenizer(tmp / "t2"),
            unet=unet,
            scheduler=d.EulerDiscreteScheduler.from_config(_ddim().config),
        )
    if family == "pixart":
        tr = d.PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=16,
            caption_channels=32,
            norm_num_groups=8,
        )
        _randomize_zero_init(tr)
        return d.PixArtAlphaPipeline(
            tokenizer=_t5_tokenizer(tmp / "t5"),
            text_encoder=_t5(),
            vae=_vae(),
            transformer=tr.eval(),
            scheduler=_ddim(),
        )
    if family == "sd3":
        tr = d.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=64,
            out_channels=4,
        )
        _randomize_zero_init(tr)
        return d.StableDiffusion3Pipeline(
            transformer=tr.eval(),
            scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(shift=0.1),
            text_encoder=_clip(projection=True),
            tokenizer=_clip_tokenizer(tmp / "t1"),
            text_encoder_2=_clip(projection=True),
            tokenizer_2=_clip_tokenizer(tmp / "t2"),
            text_encoder_3=_t5(),
            tokenizer_3=_t5_tokenizer(tmp / "t3"),
        )
    if family == "flux":
        tr = d.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        )
        _randomize_zero_init(tr)
        sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        return d.FluxPipeline(
            scheduler=sched,
            vae=_vae(shift=0.1),
            text_encoder=_clip(),
            tokenizer=_clip_tokenizer(tmp / "t1"),
            text_encoder_2=_t5(),
            tokenizer_2=_t5_tokenizer(tmp / "t2"),
            transformer=tr.eval(),
        )
    if family == "dit":
        tr = d.DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_num_groups=8,
        )
        _randomize_zero_init(tr)
        return d.DiTPipeline(
            transformer=tr.eval(),
            vae=_vae(),
            scheduler=d.DPMSolverMultistepScheduler.from_config(_ddim().config),
            id2label={0: "tench", 1: "goldfish"},
        )
    if family == "ddpm":
        unet = d.UNet2DModel(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
        return d.DDPMPipeline(unet=unet.eval(), scheduler=d.DDPMScheduler(num_train_timesteps=1000))
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def make_pipeline(family: str, folder: str | Path) -> Path:
    """Build the tiny ``family`` pipeline and `save_pretrained` it into ``folder``."""
    folder = Path(folder)
    pipe = _build(family, folder.parent / f".{folder.name}-tok")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def export_tiny(
    family: str, root: Path, prompts: list[str], resolution: tuple[int, int] | None = None, target: str = "onnxruntime"
):
    """Make the tiny ``family`` pipeline in ``root``, quantize it (minmax W8A8 on a few samples)
    and export it with its pipeline parts; returns (pipeline folder, denoiser, export folder)."""
    import warnings

    from diffquant.models.loading import LoadConfig, load_denoiser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = make_pipeline(family, root / family)
        d = load_denoiser(str(folder), LoadConfig(prompts=prompts, resolution=resolution))
    return folder, d, export_minmax(d, root, family, target)


def export_minmax(
    d, root: Path, name: str, target: str = "onnxruntime", samples: int = 2, steps: int = 3, timesteps: int = 2
) -> Path:
    """Quantize ``d`` (minmax W8A8 on ``samples`` trajectories of ``steps`` steps, ``timesteps`` kept) and export it
    with its pipeline parts to ``root/exp-<name>``."""
    from diffquant.calib_data import CalibConfig, collect
    from diffquant.exporters import export
    from diffquant.passes import load_recipe, quantize

    cfg = CalibConfig(samples=samples, steps=steps, timesteps=timesteps, guidance=d.family.default_guidance)
    calib = collect(d, cfg, cache_dir=root / f"c-{name}", progress=False)
    plan = quantize(d, load_recipe("minmax"), calib, bits="w8a8", progress=False)
    export(plan, d, root / f"exp-{name}", target=target)
    return root / f"exp-{name}"


def start_server(argv: list[str], cwd: Path):
    """Start ``python <argv...>`` running `diffquant serve ... --port 0` and return (process, URL)
    once it says it is listening (engines loaded, port bound); its stderr keeps being drained."""
    import re
    import subprocess
    import threading

    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if m := re.search(r"listening on (http://\S+)", line):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    proc.wait()
    raise AssertionError("diffquant serve exited before listening:\n" + "".join(seen))
