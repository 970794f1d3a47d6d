"""`diffquant zoo train NAME`: train a builtin model, then measure its FP benchmark metrics
into its model card (the card is what README and benchmarks quote)."""

from __future__ import annotations

import dataclasses
import json

from diffquant._io import write_json
from diffquant.models.builtin import weights_dir
from diffquant.models.train import default_train_config, train_builtin

__all__ = ["fp_metrics", "train_and_card"]


def fp_metrics(name: str, samples: int = 1000, steps: int = 25, guidance: float = 3.0, seed: int = 0) -> dict:
    """The quality protocol (docs/ARCHITECTURE.md, "Measuring quality") on the FP model: FD and accuracy of ``samples`` DDIM samples."""
    from diffquant.eval import score_samples
    from diffquant.models.data import load_digits_tensor
    from diffquant.models.loading import load_classifier, load_denoiser
    from diffquant.models.sampler import SamplerConfig, prompt_batch, sample

    d = load_denoiser(f"builtin:{name}")
    b = prompt_batch(d, samples, seed)
    imgs = d.to_images(sample(lambda inputs: d(**inputs), d, b, SamplerConfig(steps=steps, guidance=guidance), desc=f"FP metrics {name}"))
    real, _ = load_digits_tensor()
    s = score_samples(imgs, b.ids, load_classifier(), real)
    return {"fd": s.fd, "accuracy": s.accuracy, "samples": samples, "steps": steps, "guidance": guidance, "seed": seed}


def train_and_card(name: str, steps: int | None = None, samples: int = 1000) -> dict:
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
