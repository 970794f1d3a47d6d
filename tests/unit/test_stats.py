"""The verdict function: intervals are Student-t over replicates, and "A beats B" needs the paired
difference's interval to exclude 0."""

from __future__ import annotations

import math

import pytest
import torch

from diffquant.eval.quality import psnr, psnr_per_image, ssim, ssim_per_image
from diffquant.eval.stats import paired_verdict, t_interval


def test_t_interval_is_students():
    from scipy import stats

    vals = [57.0, 48.6, 104.6]
    iv = t_interval(vals)
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=sum(vals) / 3, scale=stats.sem(vals))
    assert iv.n == 3 and iv.low == pytest.approx(lo) and iv.high == pytest.approx(hi)
    assert iv.sd == pytest.approx(stats.tstd(vals))
    one = t_interval([3.0])
    assert one.low is None and one.half_width is None and one.text() == "3.0 (n = 1)"
    assert t_interval([1.0, 1.0]).half_width == 0.0


def test_paired_verdict_needs_the_interval_to_exclude_zero():
    # the digits-dit figures: tcaq vs qdiffusion at W4A6, two seeds with opposite signs
    v = paired_verdict(
        "tcaq", "qdiffusion", {1234: 57.0, 4321: 104.6}, {1234: 48.6, 4321: 47.0}, "FD to FP", lower_is_better=True
    )
    assert not v.decided and v.text == "tcaq vs qdiffusion: within noise on FD to FP" and v.seeds == [1234, 4321]
    # a consistent margin over three seeds decides, and the direction follows the metric
    a, b = {0: 10.0, 1: 11.0, 2: 12.0}, {0: 20.0, 1: 20.5, 2: 22.0}
    assert paired_verdict("A", "B", a, b, "FD to FP", lower_is_better=True).text == "A beats B on FD to FP"
    assert paired_verdict("A", "B", a, b, "PSNR", lower_is_better=False).text == "B beats A on PSNR"
    # only shared seeds count; fewer than two cannot decide
    lone = paired_verdict("A", "B", {0: 1.0, 1: 2.0}, {1: 5.0, 2: 6.0}, "FD to FP", lower_is_better=True)
    assert lone.diff is None and "not enough shared seeds (1)" in lone.text


def test_per_image_metrics_average_to_the_scores():
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(6, 1, 16, 16, generator=gen) * 2 - 1
    x = (ref + 0.1 * torch.randn(6, 1, 16, 16, generator=gen)).clamp(-1, 1)
    per = psnr_per_image(x, ref)
    mse0 = float(((x[0] - ref[0]) / 2).pow(2).mean())
    assert float(per[0]) == pytest.approx(10 * math.log10(1 / mse0), rel=1e-5)
    assert float(per.mean()) == pytest.approx(psnr(x, ref))
    assert float(ssim_per_image(x, ref).mean()) == pytest.approx(ssim(x, ref), rel=1e-6)
    assert float(ssim_per_image(ref, ref).min()) == pytest.approx(1.0)
