"""Is a sample power-law distributed? Clauset, Shalizi and Newman (SIAM Review 2009), continuous
case: x_min by the smallest Kolmogorov-Smirnov distance, alpha by maximum likelihood, and the
comparison with an alternative (exponential, lognormal; both truncated at x_min) by Vuong's
normalized log-likelihood ratio. TCAQ-DM's DAQ uses it to pick a log2 quantizer for attention
probabilities whose tail is a power law.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

__all__ = ["ALTERNATIVES", "Comparison", "PowerLawFit", "compare", "fit_power_law"]

ALTERNATIVES = ("exponential", "lognormal")


@dataclass
class PowerLawFit:
    """alpha and x_min of the tail x >= x_min (``n`` values), its KS distance, and the tail itself."""

    alpha: float
    xmin: float
    n: int
    ks: float
    tail: np.ndarray

    def loglik(self) -> np.ndarray:
        """Per-value log density of the fitted power law on the tail."""
        return np.log((self.alpha - 1) / self.xmin) - self.alpha * np.log(self.tail / self.xmin)


@dataclass
class Comparison:
    """Power law vs ``alternative`` on the tail: the summed log-likelihood ratio (> 0: the power
    law fits better) and Vuong's p-value for its sign (small: the sign is significant)."""

    alternative: str
    llr: float
    p: float

    def power_law_wins(self, p_value: float) -> bool:
        return self.llr > 0 and self.p < p_value


def fit_power_law(x: np.ndarray, candidates: int = 50, tail_min: int = 50) -> PowerLawFit | None:
    """Fit the tail of the positive values of ``x``: ``candidates`` x_min values at quantiles
    that keep at least ``tail_min`` values above them; None when too few values."""
    x = np.sort(np.asarray(x, dtype=np.float64)[np.asarray(x) > 0])
    if len(x) < tail_min:
        return None
    top = len(x) - tail_min
    best = None
    for i in np.unique(np.linspace(0, top, candidates).astype(int)):
        tail = x[i:]
        xmin = tail[0]
        logs = np.log(tail / xmin)
        if logs.sum() <= 0:
            continue
        alpha = 1 + len(tail) / logs.sum()
        model = 1 - (tail / xmin) ** (1 - alpha)
        emp = np.arange(len(tail)) / len(tail)
        ks = float(np.max(np.abs(emp - model)))
        if best is None or ks < best.ks:
            best = PowerLawFit(float(alpha), float(xmin), len(tail), ks, tail)
    return best


def _loglik_exponential(tail: np.ndarray, xmin: float) -> np.ndarray:
    lam = 1.0 / max(float(np.mean(tail - xmin)), 1e-300)
    return math.log(lam) - lam * (tail - xmin)


def _loglik_lognormal(tail: np.ndarray, xmin: float) -> np.ndarray:
    """Lognormal truncated at x_min, (mu, sigma) by maximum likelihood (Nelder-Mead from the
    untruncated estimates)."""
    logs = np.log(tail)

    def per_value(mu: float, sigma: float) -> np.ndarray:
        z_min = (math.log(xmin) - mu) / sigma
        return (
            -logs
            - math.log(sigma * math.sqrt(2 * math.pi))
            - (logs - mu) ** 2 / (2 * sigma**2)
            - special.log_ndtr(-z_min)
        )

    def neg(theta: np.ndarray) -> float:
        return -float(per_value(theta[0], math.exp(theta[1])).sum())

    start = np.array([logs.mean(), math.log(max(logs.std(), 1e-3))])
    res = optimize.minimize(neg, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-6, "maxiter": 2000})
    return per_value(res.x[0], math.exp(res.x[1]))


def compare(fit: PowerLawFit, alternative: str) -> Comparison:
    """Vuong's test of the fitted power law against ``alternative`` on the same tail."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    other = (
        _loglik_exponential(fit.tail, fit.xmin)
        if alternative == "exponential"
        else _loglik_lognormal(fit.tail, fit.xmin)
    )
    d = fit.loglik() - other
    sd = float(d.std())
    p = 1.0 if sd == 0 else float(special.erfc(abs(d.sum()) / (sd * math.sqrt(2 * len(d)))))
    return Comparison(alternative, float(d.sum()), p)
