"""Numerical helpers that more than one layer needs (the tabular and synthetic worlds), so they
sit below every layer: Student-t intervals over seeds, log-log slopes, and the closed-form
optima of RLHF and reverse KL (App. B). It imports neither torch nor numpy (the CPU toy must not
pay for torch), and the closed forms use arithmetic operators only, so one definition serves
numpy arrays, torch tensors and floats.

Without scipy (not a dependency): the t quantile is found by Newton's method on the t CDF,
which is integrated numerically (Simpson's rule); accurate to ~1e-6 for df ≥ 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TypeVar

#: a numpy array, a torch tensor or a float: the closed forms use arithmetic operators only
Array = TypeVar("Array")


def _t_pdf(x: float, df: int) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, steps: int = 600) -> float:
    """P(T ≤ x) for Student's t with ``df`` degrees of freedom (x ≥ 0 branch mirrored)."""
    a = abs(x)
    h = a / steps
    acc = _t_pdf(0.0, df) + _t_pdf(a, df)
    for k in range(1, steps):
        acc += (4 if k % 2 else 2) * _t_pdf(k * h, df)
    half = acc * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


@lru_cache(maxsize=64)
def t_quantile(p: float, df: int) -> float:
    """Inverse of :func:`t_cdf` for 0.5 ≤ p < 1: Newton's method on the CDF (its derivative is
    the pdf), safeguarded by a bracket; a few CDF evaluations instead of 60 bisection steps."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    x = 0.5 * (lo + hi)
    for _ in range(100):
        err = t_cdf(x, df) - p
        if err < 0:
            lo = x
        else:
            hi = x
        step = x - err / _t_pdf(x, df)
        x_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(x_new - x) <= 1e-14 * max(1.0, x):
            return x_new
        x = x_new
    return x


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval (lo, hi) of the mean over seeds.

    With a single value the interval is degenerate (lo = hi = mean).
    """
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, m, m
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return m, m - half, m + half


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ln y on ln x (NaN if fewer than two points or y ≤ 0)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx if sxx > 0 else float("nan")


def rlhf_logits(log_ref: Array, reward: Array, beta: Array | float) -> Array:
    """ln π up to normalisation of RLHF's optimum, eq. (1) (App. B): π ∝ π₀ exp(R/β), β > 0.
    (β → 0 is the greedy limit, which each caller resolves in its own way.)"""
    return log_ref + reward / beta  # type: ignore[operator]


def rkl_logits(log_ref: Array, reward: Array, beta: Array | float, gamma: float) -> Array:
    """ln π up to normalisation of the reverse-KL optimum, eq. (15) (App. B), γ the entropy
    weight: π ∝ π₀^{β/(β+γ)} exp(R/(β+γ)); at β = 0 the tilted model π ∝ exp(R/γ)."""
    return (beta * log_ref + reward) / (beta + gamma)  # type: ignore[operator]
