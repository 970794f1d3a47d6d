"""`diffquant zoo train NAME`: train a builtin model, then measure its FP benchmark metrics
into its model card (the card is what README and benchmarks quote)."""

from __future__ import annotations

import dataclasses
import json

from diffquant._io import write_json
from diffquant.zoo.builtin import weights_dir
from diffquant.zoo.train import default_train_config, train_builtin

__all__ = ["fp_metrics", "train_and_card"]


def fp_metrics(name: str, samples: int = 1000, steps: int = 25, guidance: float = 3.0, seed: int = 0) -> dict:
    """The quality protocol (docs/ARCHITECTURE.md, "Measuring quality") on the FP model: FD and
    accuracy of ``samples`` DDIM samples."""
    from diffquant.eval import score_samples
    from diffquant.models.loading import load_classifier, load_denoiser
    from diffquant.models.sampler import SamplerConfig, prompt_batch, sample
    from diffquant.zoo.data import load_digits_tensor

    d = load_denoiser(f"builtin:{name}")
    b = prompt_batch(d, samples, seed)
    imgs = d.to_images(
        sample(
            lambda inputs: d(**inputs), d, b, SamplerConfig(steps=steps, guidance=guidance), desc=f"FP metrics {name}"
        )
    )
    real, _ = load_digits_tensor()  # 16x16: larger samples are area-averaged to it for the classifier
    s = score_samples(imgs, b.ids, load_classifier(), real)
    return {"fd": s.fd, "accuracy": s.accuracy, "samples": samples, "steps": steps, "guidance": guidance, "seed": seed}


def _train_ldm(steps: int | None) -> None:
    """Train digits-ldm beside the shipped folder, then swap it in (the old one is kept until then)."""
    import shutil

    from diffquant.zoo.ldm import LdmTrainConfig, train_ldm

    cfg = LdmTrainConfig(**({"steps": steps} if steps else {}))
    final, fresh = weights_dir() / "digits-ldm", weights_dir() / ".digits-ldm-new"
    shutil.rmtree(fresh, ignore_errors=True)
    card = train_ldm(fresh, cfg)
    shutil.rmtree(final, ignore_errors=True)
    fresh.rename(final)
    write_json(weights_dir() / "digits-ldm.json", card)


def train_and_card(name: str, steps: int | None = None, samples: int = 1000) -> dict:
    if name == "digits-ldm":
        _train_ldm(steps)
    else:
        cfg = default_train_config(name)
        if steps:
            cfg = dataclasses.replace(cfg, steps=steps)
        train_builtin(name, cfg)
    card_path = weights_dir() / f"{name}.json"
    card = json.loads(card_path.read_text())
    if name != "digits-classifier":
        card["fp_metrics"] = fp_metrics(name, samples)
    write_json(card_path, card)
    print(json.dumps(card, indent=2))
    return card
