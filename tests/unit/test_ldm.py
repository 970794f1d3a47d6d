"""digits-ldm's training code on a few steps: the tokenizer spells prompt words whole, the saved
folder is a StableDiffusionPipeline diffusers loads, and diffquant loads it as a digits model
(classifier-scored, one prompt per class) whose pipeline parts export."""

import warnings

import torch

from diffquant.models.families import DigitsLDM
from diffquant.models.loading import LoadConfig, _from_pipeline
from diffquant.zoo.ldm import LdmTrainConfig, ldm_prompts, train_ldm, write_tokenizer


def test_tokenizer_spells_prompt_words_whole(tmp_path):
    tok = write_tokenizer(tmp_path / "tok")
    assert tok.tokenize("a handwritten seven") == ["a</w>", "handwritten</w>", "seven</w>"]
    assert len(tok("the digit zero written by hand").input_ids) == 8  # 6 words + start + end
    assert tok.tokenize("cat") == ["c", "a", "t</w>"]  # unknown words fall back to characters


def test_train_save_load(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        card = train_ldm(
            tmp_path / "ldm", LdmTrainConfig(vae_steps=2, steps=2, warmup_steps=1, batch_size=4, vae_batch_size=4)
        )
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "ldm"))
    assert card["scaling_factor"] > 0 and pipe.vae.config.scaling_factor == card["scaling_factor"]
    out = pipe(
        "a handwritten seven", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert out.shape == (1, 32, 32, 1)
    d = _from_pipeline(tmp_path / "ldm", LoadConfig(prompts=ldm_prompts()), DigitsLDM, "builtin:digits-ldm")
    assert d.family.feature_model and d.prompts[7] == "a handwritten seven" and d.sample_shape == (4, 8, 8)
    assert d.text_plan is not None and d.conditioning["encoder_hidden_states"].shape == (11, 16, 64)
    assert d.to_images(torch.zeros(1, 4, 8, 8)).shape == (1, 1, 32, 32)
