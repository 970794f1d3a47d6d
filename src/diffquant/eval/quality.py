"""Image quality. For any model: fidelity to the FP pipeline from the same seeds and prompts
(PSNR / SSIM of the images, final-latent cosine, per-timestep noise-prediction SNR and cosine).
Where a feature model exists (the digits classifier for the builtins): Frechet distance on its
features and accuracy (the classifier agrees with the requested class)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "QualityScores",
    "cosine",
    "frechet_distance",
    "noise_fidelity",
    "psnr",
    "psnr_per_image",
    "score_fidelity",
    "score_samples",
    "ssim",
    "ssim_per_image",
]


@dataclass
class QualityScores:
    fd: float | None = None
    accuracy: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    fd_fp: float | None = None  # Frechet distance to the reference (FP) samples' features
    latent_cosine: float | None = None  # mean per-sample cosine of the final latents to the FP ones
    psnr_sd: float | None = None  # the spread of the per-image PSNR / SSIM over the images
    ssim_sd: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b`` [N, D].

    ``eps`` * I is added to both covariances: the classifier's ReLU features include units that
    never fire, which make the covariances singular and sqrtm unstable.
    """
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    reg = np.eye(a.shape[1]) * eps
    s1, s2 = np.cov(a, rowvar=False) + reg, np.cov(b, rowvar=False) + reg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [-1, 1], computed on [0, 1]; capped at 100 dB."""
    return float(psnr_per_image(x, ref).mean())


def psnr_per_image(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Each image's PSNR (dB), images in [-1, 1] computed on [0, 1], capped at 100 dB."""
    mse = ((x - ref) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(1 / mse)).clamp(max=100)


def ssim(x: torch.Tensor, ref: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Gaussian window, valid region) of images in [-1, 1], computed on [0, 1]."""
    return float(_ssim_map(x, ref, window, sigma).mean())


def ssim_per_image(x: torch.Tensor, ref: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Each image's SSIM (the mean of its SSIM map)."""
    return _ssim_map(x, ref, window, sigma).flatten(1).mean(1)


def _ssim_map(x: torch.Tensor, ref: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    x, ref = (x + 1) / 2, (ref + 1) / 2
    if min(x.shape[-2:]) < window:  # tiny images: the largest odd window that fits
        window = max(1, (min(x.shape[-2:]) - 1) // 2 * 2 + 1)
    g = torch.exp(-((torch.arange(window) - window // 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    k = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)
    blur = lambda t: F.conv2d(t, k, groups=x.shape[1])  # noqa: E731
    mx, my = blur(x), blur(ref)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(ref * ref) - my**2, blur(x * ref) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))


@torch.no_grad()
def score_samples(
    samples: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.nn.Module,
    real: torch.Tensor,
    reference: torch.Tensor | None = None,
) -> QualityScores:
    """Score ``samples`` [N,1,H,W] asked to be ``labels``; ``real`` are the data set images and
    ``reference`` the FP model's samples from the same seeds (for PSNR / SSIM and the FD to
    them, which unlike the FD to the real data grows with every departure from the FP model)."""
    feats = classifier.features(_classifier_size(samples, real)).numpy().astype(np.float64)
    real_feats = classifier.features(real).numpy().astype(np.float64)
    acc = float((classifier.head(torch.from_numpy(feats).float()).argmax(1) == labels).float().mean())
    scores = QualityScores(fd=frechet_distance(feats, real_feats), accuracy=acc)
    if reference is not None:
        per_psnr, per_ssim = psnr_per_image(samples, reference), ssim_per_image(samples, reference)
        scores.psnr, scores.psnr_sd = float(per_psnr.mean()), float(per_psnr.std()) if len(per_psnr) > 1 else None
        scores.ssim, scores.ssim_sd = ssim(samples, reference), float(per_ssim.std()) if len(per_ssim) > 1 else None
        scores.fd_fp = frechet_distance(
            feats, classifier.features(_classifier_size(reference, real)).numpy().astype(np.float64)
        )
    return scores


def _classifier_size(images: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Images larger than the classifier's input (digits-ldm draws 32x32) area-averaged to it."""
    size = tuple(real.shape[-2:])
    return images if tuple(images.shape[-2:]) == size else F.interpolate(images, size=size, mode="area")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-sample cosine similarity of two batches."""
    return float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean())


@torch.no_grad()
def score_fidelity(
    images: torch.Tensor,
    ref_images: torch.Tensor,
    latents: torch.Tensor | None = None,
    ref_latents: torch.Tensor | None = None,
) -> QualityScores:
    """Fidelity to the FP samples of the same seeds and prompts, for any model."""
    per_psnr, per_ssim = psnr_per_image(images, ref_images), ssim_per_image(images, ref_images)
    spread = {"psnr_sd": float(per_psnr.std()), "ssim_sd": float(per_ssim.std())} if len(images) > 1 else {}
    scores = QualityScores(psnr=float(per_psnr.mean()), ssim=ssim(images, ref_images), **spread)
    if latents is not None and ref_latents is not None:
        scores.latent_cosine = cosine(latents, ref_latents)
    return scores


@torch.no_grad()
def noise_fidelity(fp, models: dict, inputs: list) -> list[dict]:
    """Per recorded timestep: SNR (dB) and cosine of each model's noise prediction against the
    FP denoiser's on the same recorded inputs ((timestep, named inputs) pairs)."""
    rows = []
    for ts, named in inputs:
        ref = fp(**named).double()
        row = {"timestep": float(ts)}
        for name, fn in models.items():
            got = fn(named).double()
            err = float(((got - ref) ** 2).sum())
            row[name] = {
                "snr_db": float(10 * np.log10(float((ref**2).sum()) / max(err, 1e-30))),
                "cosine": cosine(got, ref),
            }
        rows.append(row)
    return rows
