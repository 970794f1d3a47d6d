"""Claims that survive a change of seed: a mean with its 95 % t-interval over replicates, and the
one function that says whether A beats B: the paired difference over the seeds both were run
with, whose t-interval must exclude 0; otherwise the two are within noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Interval", "Verdict", "paired_verdict", "t_interval"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` replicates and its two-sided t-interval (None where n < 2: no spread to
    measure); ``sd`` the sample standard deviation."""

    mean: float
    low: float | None
    high: float | None
    n: int
    sd: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2

    def excludes(self, value: float) -> bool:
        return self.low is not None and not (self.low <= value <= self.high)

    def text(self, digits: int = 1) -> str:
        """``mean ± half-width (n)``, or ``mean (n = 1)`` for a single replicate."""
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (n = {self.n})"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} (n = {self.n})"


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` and its Student-t interval (n - 1 degrees of freedom)."""
    from scipy import stats

    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    n, mean = len(vals), sum(vals) / len(vals)
    if n < 2:
        return Interval(mean, None, None, n, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


@dataclass(frozen=True)
class Verdict:
    """A against B on one metric over the seeds both ran with: the paired difference A - B and
    its interval, and the sentence a table or the README may print."""

    a: str
    b: str
    metric: str
    seeds: list[int]
    diff: Interval | None
    text: str

    @property
    def decided(self) -> bool:
        return self.diff is not None and self.diff.excludes(0.0)


def paired_verdict(
    a: str, b: str, a_values: dict[int, float], b_values: dict[int, float], metric: str, *, lower_is_better: bool
) -> Verdict:
    """``"A beats B"`` only when the t-interval of the per-seed differences (seeds both have)
    excludes 0; ``"within noise"`` otherwise; ``"not enough seeds"`` under two shared seeds."""
    seeds = sorted(set(a_values) & set(b_values))
    if len(seeds) < 2:
        return Verdict(a, b, metric, seeds, None, f"{a} vs {b}: not enough shared seeds ({len(seeds)}) for a verdict")
    diff = t_interval([a_values[s] - b_values[s] for s in seeds])
    if not diff.excludes(0.0):
        return Verdict(a, b, metric, seeds, diff, f"{a} vs {b}: within noise on {metric}")
    a_better = (diff.mean < 0) == lower_is_better
    winner, loser = (a, b) if a_better else (b, a)
    return Verdict(a, b, metric, seeds, diff, f"{winner} beats {loser} on {metric}")
