"""The tilted world's preference model and the target's log-density up to ln Z(x).

π*(y|x) = π₀(y|x)·exp(r(x,y)/β*)/Z(x) (KL-regularised RL read as Bayesian inference, Korbak
et al. 2022), so ln π*(a|x) − ln π*(b|x) = Δ ln π₀ + Δr/β*: Z(x) cancels within a prompt and
the paper's preference model, eq. (3) of arXiv 2506.01523 v2,

    P(a ≻ b | x) = σ(γ · ln π*(a|x)/π*(b|x)),

is exact without it. Everything here is a pure function of recorded ln π₀ and r.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from distalign.errors import ConfigError


def check_positive(name: str, value: object) -> float:
    """β* and γ must be finite numbers > 0 (a one-line ConfigError otherwise)."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number; it must be finite and > 0") from None
    if isinstance(value, bool) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name}={value!r} must be a finite number > 0")
    return v


def log_tilt(logp0: ArrayLike, r: ArrayLike, beta_star: float) -> NDArray[np.float64]:
    """ln π*(y|x) + ln Z(x) = ln π₀(y|x) + r(x,y)/β*: π*'s log-density up to its prompt's
    constant, which every within-prompt comparison (labels, oracle judge) may leave out."""
    return np.asarray(logp0, np.float64) + np.asarray(r, np.float64) / beta_star


def preference_logit(logp0_a: ArrayLike, r_a: ArrayLike, logp0_b: ArrayLike, r_b: ArrayLike,
                     beta_star: float, gamma: float) -> NDArray[np.float64]:
    """γ · ln π*(a|x)/π*(b|x) = γ (Δ ln π₀ + Δr/β*): the log-odds of eq. (3)."""
    return gamma * (log_tilt(logp0_a, r_a, beta_star) - log_tilt(logp0_b, r_b, beta_star))


def preference_prob(logp0_a: ArrayLike, r_a: ArrayLike, logp0_b: ArrayLike, r_b: ArrayLike,
                    beta_star: float, gamma: float) -> NDArray[np.float64]:
    """P(a ≻ b | x) of eq. (3), exact (σ computed without overflow)."""
    z = preference_logit(logp0_a, r_a, logp0_b, r_b, beta_star, gamma)
    return np.exp(-np.logaddexp(0.0, -z))


def draw_labels(p: ArrayLike, rng: np.random.Generator) -> NDArray[np.bool_]:
    """a ≻ b with probability ``p`` each, independently (True: a is chosen)."""
    p = np.asarray(p, np.float64)
    return rng.random(p.shape) < p


def label_stats(dlogp0: ArrayLike, dr: ArrayLike, beta_star: float,
                gamma: float) -> dict[str, float]:
    """What labels drawn by eq. (3) on pairs with these differences can tell.

    - ``bayes_acc``: E max(P, 1−P), the accuracy of the best possible predictor of a label;
    - ``pi0_acc``: the expected accuracy of "the likelier reply under π₀ wins" (no reward);
    - ``share_logp0``: Var(Δ ln π₀) / (Var(Δ ln π₀) + Var(Δr/β*)), the share of the label
      log-odds' variance that comes from π₀'s likelihood rather than the reward;
    - ``mean_abs_logit``: E|γ ln π*(a)/π*(b)|.
    """
    d0, d1 = np.asarray(dlogp0, np.float64), np.asarray(dr, np.float64) / beta_star
    z = gamma * (d0 + d1)
    p = np.exp(-np.logaddexp(0.0, -z))
    v0, v1 = float(np.mean(d0**2)), float(np.mean(d1**2))  # differences: mean 0 by symmetry
    pi0 = np.where(d0 > 0, p, np.where(d0 < 0, 1.0 - p, 0.5))
    return {
        "bayes_acc": float(np.mean(np.maximum(p, 1.0 - p))),
        "pi0_acc": float(np.mean(pi0)),
        "share_logp0": v0 / (v0 + v1) if v0 + v1 > 0 else math.nan,
        "mean_abs_logit": float(np.mean(np.abs(z))),
    }
