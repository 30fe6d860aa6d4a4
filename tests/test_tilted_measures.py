"""The tilted world's measures against exact values: the synthetic world (9 prompts × 39
responses, enumerable) with π₀ = its π_sft, a bounded reward r = tanh(2·N(0, 1)) in (−1, 1)
drawn per (prompt, response), π*_tilt = π₀·exp(r/β*)/Z computed by enumeration, and π̂ = the
synthetic world's own π* (unrelated to the tilt)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distalign.synthetic.world import build_world, sample_responses
from distalign.tilted.labels import draw_labels, label_stats, preference_prob
from distalign.tilted.measures import (
    acceptance_prob,
    forward_kl,
    log_partition,
    log_partition_from_acceptance,
    oracle_win_prob,
    policy_stats,
    rejection_accept,
    rejection_forward_kl,
    reverse_kl,
    reward_model_stats,
)

BETA = 0.5
R_MAX = 1.0


@pytest.fixture(scope="module")
def tables():
    world = build_world()
    l0 = world.logp_sft().double()  # π₀, normalised on 𝒜
    gen = torch.Generator().manual_seed(0)
    r = torch.tanh(2 * torch.randn(l0.shape, generator=gen, dtype=torch.float64))
    ls = torch.log_softmax(l0 + r / BETA, -1)  # π* of the tilt, exact
    lh = world.logp_star().double()  # a policy π̂ ≠ π*, ≠ π₀
    return l0, r, ls, lh


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


def draws(logp: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    x = torch.arange(logp.shape[0])
    return sample_responses(logp, x, torch.Generator().manual_seed(seed), n)  # [P, n]


def per_prompt(table: torch.Tensor, idx: torch.Tensor) -> list[np.ndarray]:
    return [table[x, idx[x]].numpy() for x in range(table.shape[0])]


def test_forward_kl_by_importance_sampling_matches_the_exact_value(tables):
    l0, r, ls, lh = tables
    want = exact_kl(ls, lh)
    assert 0.3 < want < 3  # a non-trivial target
    estimates = []
    for seed in range(10):
        idx = draws(l0, 400, seed)
        out = forward_kl(per_prompt(l0, idx), per_prompt(r, idx), per_prompt(lh, idx), BETA)
        assert abs(out["kl_fwd"] - want) < out["kl_fwd_se"]  # within its own standard error
        assert out["prompts"] == 9 and 0.3 < out["ess_per_sample"] < 1
        estimates.append(out["kl_fwd"])
    # and unbiased to within the spread of repeated estimates (SNIS bias is O(1/n))
    spread = np.std(estimates, ddof=1) / math.sqrt(len(estimates))
    assert abs(np.mean(estimates) - want) < 4 * spread + 2e-3
    # π̂ = π₀: KL(π*‖π₀), and the ESS of flat weights is n
    idx = draws(l0, 400, 99)
    g0 = per_prompt(l0, idx)
    self_kl = forward_kl(g0, per_prompt(r, idx), g0, BETA)
    assert self_kl["kl_fwd"] == pytest.approx(exact_kl(ls, l0), abs=self_kl["kl_fwd_se"])
    flat = forward_kl(g0, [np.zeros(400)] * 9, g0, BETA)
    assert flat["kl_fwd"] == pytest.approx(0, abs=1e-12) and flat["ess_per_sample"] == 1


def test_log_partition_and_reverse_kl_match_the_exact_values(tables):
    l0, r, ls, lh = tables
    log_z = torch.logsumexp(l0 + r / BETA, -1).numpy()
    idx = draws(l0, 4000, 1)
    est = log_partition(per_prompt(r, idx), BETA)
    np.testing.assert_allclose(est, log_z, atol=0.05)
    # reverse KL(π̂‖π*) from π̂'s own samples with the estimated ln Z
    jdx = draws(lh, 4000, 2)
    out = reverse_kl(per_prompt(lh, jdx), per_prompt(l0, jdx), per_prompt(r, jdx), BETA, est)
    want = exact_kl(lh, ls)
    assert abs(out["kl_rev"] - want) < out["kl_rev_se"]
    assert out["kl_rev"] == pytest.approx(want, abs=0.05)


def chi2_quantile(k: int, z: float = 3.09) -> float:
    """Wilson–Hilferty approximation of the χ²_k quantile at the normal z (3.09: p = 0.001)."""
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def test_rejection_sampling_has_the_right_acceptance_rate_and_distribution(tables):
    l0, r, ls, lh = tables
    m = 20000
    idx = draws(l0, m, 3)
    rng = np.random.default_rng(0)
    log_z = torch.logsumexp(l0 + r / BETA, -1).numpy()
    accepted, groups = [], []
    for x in range(9):
        keep = rejection_accept(r[x, idx[x]].numpy(), R_MAX, BETA, rng)
        accepted.append(int(keep.sum()))
        groups.append(idx[x][torch.from_numpy(keep)])
        # acceptance rate Z(x)·exp(−r_max/β*): a binomial test
        p = math.exp(log_z[x] - R_MAX / BETA)
        assert abs(keep.mean() - p) < 4 * math.sqrt(p * (1 - p) / m)
        # accepted draws follow π*(·|x): a χ² test over the 39 responses
        counts = np.bincount(groups[x].numpy(), minlength=39)
        expect = counts.sum() * ls[x].exp().numpy()
        stat = float(((counts - expect) ** 2 / expect).sum())
        assert stat < chi2_quantile(38), (x, stat)
    # ln Z from the acceptance counts, and the forward KL on exact draws of π*
    lz_acc = log_partition_from_acceptance(accepted, [m] * 9, R_MAX, BETA)
    np.testing.assert_allclose(lz_acc, log_z, atol=0.05)
    rs = rejection_forward_kl([l0[x, g].numpy() for x, g in enumerate(groups)],
                              [r[x, g].numpy() for x, g in enumerate(groups)],
                              [lh[x, g].numpy() for x, g in enumerate(groups)], BETA, lz_acc)
    assert rs["kl_fwd_rs"] == pytest.approx(exact_kl(ls, lh), abs=rs["kl_fwd_rs_se"])
    assert rs["prompts_without_draws"] == 0
    with pytest.raises(ValueError, match="above its stated bound"):
        acceptance_prob([1.5], R_MAX, BETA)


def test_labels_follow_eq3(tables):
    l0, r, ls, _ = tables
    gamma, n = 0.7, 20000
    rng = np.random.default_rng(5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(9, (n,), generator=gen)
    ab = sample_responses(l0, x, gen, num=2)
    a, b = ab[:, 0], ab[:, 1]
    p = preference_prob(l0[x, a], r[x, a], l0[x, b], r[x, b], BETA, gamma)
    # Z cancels: the same as σ(γ Δ ln π*) with the normalised π*
    np.testing.assert_allclose(p, torch.sigmoid(gamma * (ls[x, a] - ls[x, b])).numpy(),
                               atol=1e-12)
    wins = draw_labels(p, rng)
    # binomial: the number of "a wins" against Σ p, and a χ² over ten bins of p
    assert abs(wins.sum() - p.sum()) < 4 * math.sqrt(float(np.sum(p * (1 - p))))
    bins = np.minimum((p * 10).astype(int), 9)
    stat = 0.0
    for k in range(10):
        sel = bins == k
        e, v = p[sel].sum(), np.sum(p[sel] * (1 - p[sel]))
        if v > 0:
            stat += (wins[sel].sum() - e) ** 2 / v
    assert stat < chi2_quantile(10)
    stats = label_stats(l0[x, a] - l0[x, b], r[x, a] - r[x, b], BETA, gamma)
    assert stats["bayes_acc"] == pytest.approx(np.mean(np.maximum(p, 1 - p)))
    assert 0.5 < stats["pi0_acc"] <= stats["bayes_acc"] and 0 < stats["share_logp0"] < 1


def test_policy_stats_win_probability_and_reward_model_stats(tables):
    l0, r, ls, lh = tables
    gamma = 1.0
    n = 4000
    ia, ib = draws(lh, n, 7), draws(l0, n, 8)
    g = per_prompt
    st = policy_stats(g(lh, ia), g(l0, ia), g(r, ia), [np.full(n, 3.0)] * 9)
    assert st["kl_ref"] == pytest.approx(exact_kl(lh, l0), abs=4 * st["kl_ref_se"])
    assert st["gold_reward"] == pytest.approx(float((lh.exp() * r).sum(-1).mean()), abs=0.02)
    assert st["entropy"] == pytest.approx(float(-(lh.exp() * lh).sum(-1).mean()), abs=0.05)
    assert st["length"] == 3
    win = oracle_win_prob(g(l0, ia), g(r, ia), g(l0, ib), g(r, ib), BETA, gamma)
    sig = torch.sigmoid(gamma * (ls[:, :, None] - ls[:, None, :]))
    want = float(torch.einsum("pa,pab,pb->p", lh.exp(), sig, l0.exp()).mean())
    assert win["oracle_win"] == pytest.approx(want, abs=0.01)
    # a reward model equal to γ ln π* reaches the Bayes-optimal accuracy, correlation 1
    x = torch.randint(9, (5000,), generator=torch.Generator().manual_seed(9))
    ab = sample_responses(l0, x, torch.Generator().manual_seed(10), num=2)
    p = preference_prob(l0[x, ab[:, 0]], r[x, ab[:, 0]], l0[x, ab[:, 1]], r[x, ab[:, 1]],
                        BETA, gamma)
    perfect = gamma * ls
    rm = reward_model_stats(perfect[x, ab[:, 0]], perfect[x, ab[:, 1]], p)
    assert rm["rm_acc_expected"] == pytest.approx(rm["bayes_acc"])
    assert rm["rm_corr"] == pytest.approx(1.0)
    flat = reward_model_stats(np.zeros(5000), np.zeros(5000), p)
    assert flat["rm_acc"] == 0.5 and math.isnan(flat["rm_corr"])
