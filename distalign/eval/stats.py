"""Means with standard errors, bootstrap intervals, and win-rates from pairwise preferences.

Preferences follow AlpacaEval's encoding: ``p ∈ [1, 2]`` is 1 + P(output_2 ≻ output_1), so 1
means the baseline (here: the reference) wins, 2 the model, 1.5 a tie. The aggregation below
reproduces AlpacaEval 2.0's ``get_winrate`` exactly (its leaderboard's ``win_rate``,
``standard_error`` and ``discrete_win_rate``):

- a legacy ``0`` means a tie (1.5); NaN / ``None`` / values outside [1, 2] are not
  preferences and are left out of every count (``n_dropped`` says how many);
- ``win_rate`` = 100 · mean(p − 1), ``standard_error`` = 100 · sample SEM (ddof = 1);
- ``discrete_win_rate`` rounds each preference to 1 or 2 (an exact 1.5 stays a tie, worth ½);
  Python's ``round`` is half-to-even like pandas', and only an exact 1.5 is a tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean with ddof = 1); SE is NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (rows resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def cluster_bootstrap_ci(
    values: Sequence[float], groups: Sequence[str], level: float = 0.95, resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of the mean resampling whole groups (prompts): with several samples
    per prompt the rows are correlated, and only the prompts are independent draws."""
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    if len(ids) < 2:
        return math.nan, math.nan
    g = np.array([ids[x] for x in groups])
    sums = np.bincount(g, weights=np.asarray(values, dtype=np.float64), minlength=len(ids))
    counts = np.bincount(g, minlength=len(ids)).astype(np.float64)
    pick = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _valid(p: float | None) -> bool:
    return p is not None and not (isinstance(p, float) and math.isnan(p)) and 1.0 <= p <= 2.0


def winrate(preferences: Sequence[float | None], bootstrap: bool = True) -> dict[str, float]:
    """Win-rate of output_2 against output_1 from AlpacaEval-style preferences (see module doc).

    Returns percentages (0–100) and counts: ``win_rate``, ``standard_error``,
    ``discrete_win_rate``, ``n_wins``, ``n_wins_base``, ``n_draws``, ``n_total``,
    ``n_dropped`` and, with ``bootstrap``, ``ci_low``/``ci_high`` (95 % bootstrap of
    ``win_rate``).
    """
    raw = [1.5 if p == 0 else (float(p) if p is not None else None) for p in preferences]
    kept = [p for p in raw if _valid(p)]
    soft = [p - 1.0 for p in kept]
    # discrete: an exact 1.5 is a draw; everything else rounds to a win of one side
    hard = [0.5 if p == 1.5 else float(round(p)) - 1.0 for p in kept]
    mean, se = mean_se(soft)
    out = {
        "win_rate": 100 * mean,
        "standard_error": 100 * se,
        "discrete_win_rate": 100 * float(np.mean(hard)) if hard else math.nan,
        "n_wins": sum(h == 1.0 for h in hard),
        "n_wins_base": sum(h == 0.0 for h in hard),
        "n_draws": sum(h == 0.5 for h in hard),
        "n_total": len(kept),
        "n_dropped": len(raw) - len(kept),
    }
    if bootstrap:
        lo, hi = bootstrap_ci(soft)
        out["ci_low"], out["ci_high"] = 100 * lo, 100 * hi
    return out
