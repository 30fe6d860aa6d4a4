"""The tabular world and its sampler follow eq. (3) and App. D.1 of the paper."""

from __future__ import annotations

import math

import numpy as np

from distalign.tabular import TorchRandom, make_world, pair_counts, sample_pairs

GAMMA = 0.5


def test_world_tables_are_normalised_and_independent_draws() -> None:
    w = make_world(4, 3, 6, GAMMA, 0.1, rng=TorchRandom(0))
    assert w.log_star.shape == (4, 3, 6)
    for t in (w.log_star, w.log_ref, w.log_mu):
        assert np.allclose(np.exp(t).sum(-1), np.ones((4, 3)))
    assert np.array_equal(w.log_mu, w.log_ref)  # μ = π₀ (our reading of App. D.1; it is silent)
    assert not np.allclose(w.log_star, w.log_ref)  # π₀ is not derived from π*
    # logits ~ N(0, 0.1²): centred log-probs have spread ≈ 0.1
    sd = (w.log_star - w.log_star.mean(-1, keepdims=True)).std(ddof=1)
    assert 0.05 < float(sd) < 0.15


def test_sampler_win_rates_match_the_preference_model() -> None:
    """Empirical P(a ≻ b | x) = σ(γ Δ ln π*) within 5 binomial standard errors, and x, a ∼ U, μ."""
    rng = TorchRandom(1)
    w = make_world(2, 2, 3, GAMMA, 1.0, mu="uniform", rng=rng)
    n = 300_000
    pairs = sample_pairs(w, n, rng)
    counts = pair_counts(pairs, 0, n, 2, 3)  # C[s, x, winner, loser]
    assert int(counts.sum()) == 2 * n
    p_win = w.win_prob()
    for s in range(2):
        for x in range(2):
            for a in range(3):
                for b in range(a + 1, 3):
                    total = float(counts[s, x, a, b] + counts[s, x, b, a])
                    assert total > 1000
                    p = float(p_win[s, x, a, b])
                    se = math.sqrt(p * (1 - p) / total)
                    assert abs(float(counts[s, x, a, b]) / total - p) < 5 * se
    # contexts uniform, responses from μ (each pair contributes two responses)
    per_x = counts.sum((-1, -2)) / n
    assert np.abs(per_x - 0.5).max() < 5 * math.sqrt(0.25 / n)
    appear = counts.sum(-1) + counts.sum(-2)  # [s, x, K]
    freq = appear / appear.sum(-1, keepdims=True)
    mu = np.exp(w.log_mu)
    assert np.abs(freq - mu).max() < 5 * math.sqrt(0.25 / (n / 2))


def test_pair_counts_prefixes_are_nested() -> None:
    rng = TorchRandom(2)
    w = make_world(3, 4, 5, GAMMA, 1.0, rng=rng)
    pairs = sample_pairs(w, 1000, rng)
    a = pair_counts(pairs, 0, 600, 4, 5)
    b = pair_counts(pairs, 600, 1000, 4, 5)
    assert np.array_equal(a + b, pair_counts(pairs, 0, 1000, 4, 5))
    assert np.array_equal(a.sum((1, 2, 3)), np.full((3,), 600.0))
