"""Parity, image quality metrics, and the run report."""

from diffquant.eval.parity import ParityResult, TimestepParity, check_parity, merge_parity
from diffquant.eval.quality import (
    QualityScores,
    frechet_distance,
    noise_fidelity,
    psnr,
    score_fidelity,
    score_samples,
    ssim,
)
from diffquant.eval.report import save_grid, write_markdown

__all__ = [
    "ParityResult",
    "QualityScores",
    "TimestepParity",
    "check_parity",
    "merge_parity",
    "frechet_distance",
    "noise_fidelity",
    "psnr",
    "save_grid",
    "score_fidelity",
    "score_samples",
    "ssim",
    "write_markdown",
]
