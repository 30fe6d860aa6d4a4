"""Ties in the toy are decided by a stated rule, not by rounding.

At n = 32 many contexts hold no training pair, so R̂ ties exactly in exact arithmetic (and to
~1e-11 in floating point), and several β have the same held-out log-likelihood. RLHF at β = 0
was evaluated at β = 1e-12: its ln π differences within a tie were then rounding divided by
1e-12 (held-out log-likelihoods off by up to 4.5), and argmax picked among tied β by rounding.
The records under a perturbation of R̂ are checked in test_tabular_fast.py.
"""

from __future__ import annotations

import numpy as np

from distalign.tabular import ToyConfig
from distalign.tabular.config import REWARD_TIE, TIE, first_within, greedy_tiers
from distalign.tabular.fast import engine


def test_first_within_takes_the_smallest_index_among_ties() -> None:
    v = np.array([[0.5, 1.0, 1.0 - TIE / 2, 1.0 + TIE / 4], [3.0, 2.0, 1.0, 3.0 - 2 * TIE]])
    assert first_within(v, "max")[:, 0].tolist() == [1, 0]
    assert first_within(-v, "min")[:, 0].tolist() == [1, 0]
    assert first_within(np.array([2.0, 1.0, 1.0 + TIE / 2, 5.0]), "min").tolist() == [1]


def test_greedy_tiers_chain_ties_and_keep_gaps() -> None:
    t = REWARD_TIE
    r = np.array([0.0, 0.3 * t, 5.0, -1.0, 0.6 * t, 5.0 - 0.4 * t, 2 * t + 0.6 * t])
    # 0, 0.3t, 0.6t chain (steps < REWARD_TIE) into one tier; 5 − 0.4t ties 5; 2.6t is apart
    assert greedy_tiers(r).tolist() == [2, 2, 0, 3, 2, 0, 1]
    assert greedy_tiers(np.array([[1.0, 1.0], [0.0, 2.0]])).tolist() == [[0, 0], [1, 0]]


def test_greedy_rlhf_is_ref_on_the_best_tier() -> None:
    """β = 0: π₀ renormalised on the tied best responses, no mass elsewhere."""
    cfg = ToyConfig.from_preset("paper", seeds=1, ns=(32,), threads=1, methods=("rlhf",))
    grid = engine.Grid(cfg)
    grid.reward[..., :] = 0.0
    grid.reward[..., 3] = grid.reward[..., 7] = 1.0 + 1e-12
    grid.reward[..., 7] -= 2e-12
    log_pi = engine.rlhf(grid, np.array([0.0]))[:, :, :, 0]  # [N, 2, S, X, K]
    ref = np.exp(grid.log_ref)[None, None]
    want = np.zeros_like(log_pi)
    want[..., [3, 7]] = ref[..., [3, 7]] / ref[..., [3, 7]].sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(log_pi), want, atol=1e-12)
    # within the tier, ln π ratios are ln π₀ ratios to rounding
    lr = grid.log_ref[..., 3] - grid.log_ref[..., 7]
    np.testing.assert_allclose(log_pi[..., 3] - log_pi[..., 7],
                               np.broadcast_to(lr, log_pi.shape[:-1]), atol=1e-12)
