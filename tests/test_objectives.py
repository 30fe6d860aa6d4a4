"""Each objective's value and autograd gradient against an independently written formula."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distalign.objectives import (
    bt_reward_loss,
    distill_loss,
    dpo_loss,
    gae,
    kl_penalty,
    online_kl_surrogate,
    pmle_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preference_logprob,
    rebel_loss,
    shaped_rewards,
    whiten,
)


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons need float64; restore the global default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def sig(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def leaf(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).requires_grad_(True)


def grads(loss: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, xs)


def test_preference_logprob_is_tilted_bradley_terry() -> None:
    pa, pb = torch.tensor([0.2, 0.05]), torch.tensor([0.1, 0.3])
    gamma = 0.7
    expect = torch.log(pa**gamma / (pa**gamma + pb**gamma))  # eq. (2)
    assert torch.allclose(preference_logprob(pa.log(), pb.log(), gamma), expect, atol=1e-14)


@pytest.mark.parametrize("weighted", [False, True])
def test_pmle_gradient(weighted: bool) -> None:
    c, r, gamma = leaf(6, seed=1), leaf(6, seed=2), 0.3
    w = torch.rand(6, generator=torch.Generator().manual_seed(3)) if weighted else None
    loss, _ = pmle_loss(c, r, gamma, w)
    gc, gr = grads(loss, c, r)
    m = gamma * (c - r).detach()
    wt = w / w.sum() if weighted else torch.full((6,), 1 / 6)
    assert torch.allclose(loss, (wt * -torch.log(sig(m))).sum(), atol=1e-14)
    assert torch.allclose(gc, -gamma * sig(-m) * wt, atol=1e-14)
    assert torch.allclose(gr, gamma * sig(-m) * wt, atol=1e-14)


def test_dpo_gradient() -> None:
    c, r, rc, rr = (leaf(5, seed=s) for s in range(4))
    gamma = 0.1
    loss, metrics = dpo_loss(c, r, rc, rr, gamma)
    gc, gr, grc = grads(loss, c, r, rc)
    m = gamma * ((c - rc) - (r - rr)).detach()
    assert torch.allclose(loss, -torch.log(sig(m)).mean(), atol=1e-14)
    assert torch.allclose(gc, -gamma * sig(-m) / 5, atol=1e-14)
    assert torch.allclose(gr, gamma * sig(-m) / 5, atol=1e-14)
    assert torch.allclose(grc, gamma * sig(-m) / 5, atol=1e-14)
    assert math.isclose(float(metrics["rewards/accuracy"]), 0.4, rel_tol=1e-6)  # 2 of 5 > 0
    assert int((m > 0).sum()) == 2


def test_bt_reward_gradient() -> None:
    rc, rr = leaf(7, seed=4), leaf(7, seed=5)
    loss, _ = bt_reward_loss(rc, rr)
    gc, gr = grads(loss, rc, rr)
    m = (rc - rr).detach()
    assert torch.allclose(gc, -sig(-m) / 7, atol=1e-14)
    assert torch.allclose(gr, sig(-m) / 7, atol=1e-14)


def test_rebel_gradient() -> None:
    l1, l2, b1, b2, r1, r2 = (leaf(4, seed=s) for s in range(6))
    eta = 2.5
    loss, _ = rebel_loss(l1, l2, b1, b2, r1, r2, eta)
    g1, g2, gb1, gr1 = grads(loss, l1, l2, b1, r1)
    err = ((l1 - b1) - (l2 - b2) - eta * (r1 - r2)).detach()
    assert torch.allclose(loss, (err**2).mean(), atol=1e-14)
    assert torch.allclose(g1, 2 * err / 4, atol=1e-14)
    assert torch.allclose(g2, -2 * err / 4, atol=1e-14)
    assert torch.allclose(gb1, -2 * err / 4, atol=1e-14)
    assert torch.allclose(gr1, -2 * eta * err / 4, atol=1e-14)


def test_distill_value_gradient_and_symmetry() -> None:
    l1, l2 = leaf(5, seed=7), leaf(5, seed=8)
    p = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7])
    gamma = 0.4
    loss, _ = distill_loss(l1, l2, p, gamma)
    g1, g2 = grads(loss, l1, l2)
    q = sig(gamma * (l1 - l2)).detach()
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))  # KL(Bern p‖Bern q)
    assert torch.allclose(loss, kl.mean(), atol=1e-12)
    assert torch.allclose(g1, gamma * (q - p) / 5, atol=1e-14)
    assert torch.allclose(g2, -gamma * (q - p) / 5, atol=1e-14)
    swapped, _ = distill_loss(l2, l1, 1 - p, gamma)  # labels do not matter (eq. (11))
    assert torch.allclose(swapped, loss, atol=1e-14)
    at_target, _ = distill_loss(torch.log(p / (1 - p)) / gamma, torch.zeros(5), p, gamma)
    assert at_target.abs() < 1e-12


def _categorical(K: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g).requires_grad_(True)
    ref = torch.log_softmax(torch.randn(K, generator=g), -1)
    return theta, ref


def test_kl_estimators_are_unbiased_and_k3_nonnegative() -> None:
    theta, ref = _categorical()
    logp = torch.log_softmax(theta, -1).detach()
    p = logp.exp()
    exact = (p * (logp - ref)).sum()
    k1, k3 = kl_penalty(logp, ref, "k1"), kl_penalty(logp, ref, "k3")
    assert torch.allclose((p * k1).sum(), exact, atol=1e-14)
    assert torch.allclose((p * k3).sum(), exact, atol=1e-14)
    assert (k3 >= 0).all()
    # k3 = (r − 1) − ln r with r = π₀/π; d k3 / d ln π = 1 − r
    lp = logp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_penalty(lp, ref, "k3").sum(), lp)
    assert torch.allclose(g, 1 - torch.exp(ref - logp), atol=1e-14)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")  # type: ignore[arg-type]


@pytest.mark.parametrize("baseline", [False, True])
def test_online_kl_surrogate_expected_gradient(baseline: bool) -> None:
    """E over exactly enumerated batches of ∇surrogate = β∇KL, with or without the
    leave-one-out baseline (a plain batch mean would shrink it by 1 − 1/B)."""
    theta, ref = _categorical(K=4, seed=1)
    beta, B = 0.3, 3
    p = torch.softmax(theta, -1).detach()
    (exact,) = torch.autograd.grad(
        beta * (torch.softmax(theta, -1) * (torch.log_softmax(theta, -1) - ref)).sum(), theta
    )
    expected = torch.zeros_like(theta)
    for batch in itertools.product(range(4), repeat=B):
        idx = torch.tensor(batch)
        logp = torch.log_softmax(theta, -1)[idx][:, None]  # one-token responses
        loss, _ = online_kl_surrogate(logp, ref[idx][:, None], torch.ones(B, 1), beta, baseline)
        (g,) = torch.autograd.grad(loss, theta)
        expected += p[idx].prod() * g
    assert torch.allclose(expected, exact, atol=1e-12)


def test_shaped_rewards_places_score_on_last_real_token() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5, -0.1], [-0.3, -0.7, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -0.2], [-0.1, -0.2, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # row 1 ends early, then padding
    score = torch.tensor([2.0, -1.0])
    beta, gam = 0.1, 0.05
    rewards, _ = shaped_rewards(score, logp, ref, mask, beta, gam, "k1")
    expect = (-beta * (logp - ref) - gam * logp) * mask
    expect[0, 2] += 2.0
    expect[1, 1] += -1.0
    assert torch.allclose(rewards, expect, atol=1e-14)
    assert rewards[0, 3] == 0 and (rewards[1, 2:] == 0).all()  # nothing on padding


def _gae_loop(r: list[float], v: list[float], discount: float, lam: float) -> list[float]:
    adv, nxt_v, nxt_a = [0.0] * len(r), 0.0, 0.0
    for t in reversed(range(len(r))):
        delta = r[t] + discount * nxt_v - v[t]
        nxt_a = delta + discount * lam * nxt_a
        adv[t], nxt_v = nxt_a, v[t]
    return adv


def test_gae_matches_loop_and_monte_carlo_closed_form() -> None:
    r = torch.tensor([[0.1, -0.2, 0.3, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0, 0.0]])
    v = torch.tensor([[0.2, 0.1, -0.1, 0.4, 7.0], [0.3, -0.5, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    adv, ret = gae(r, v, mask, discount=0.9, lam=0.8)
    for b, L in enumerate((4, 2)):
        ref = _gae_loop(r[b, :L].tolist(), v[b, :L].tolist(), 0.9, 0.8)
        assert torch.allclose(adv[b, :L], torch.tensor(ref), atol=1e-12)
        assert (adv[b, L:] == 0).all()
    assert torch.allclose(ret, (adv + v) * mask, atol=1e-14)
    # λ = discount = 1: A_t = Σ_{k ≥ t} r_k − V_t (Monte-Carlo return minus baseline)
    adv1, _ = gae(r, v, mask, discount=1.0, lam=1.0)
    mc = torch.flip(torch.cumsum(torch.flip(r * mask, [1]), 1), [1])
    assert torch.allclose(adv1, (mc - v) * mask, atol=1e-12)


def test_ppo_policy_loss_matches_clipped_formula_and_gradient() -> None:
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    logp = (old + torch.tensor([[0.5, -0.5, 0.05, 0.3]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    eps = 0.2
    loss, metrics = ppo_policy_loss(logp, old, adv, mask, eps)
    rho = torch.exp(logp - old).detach()
    per = torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps))
    assert torch.allclose(loss, (per * mask).sum() / 3, atol=1e-14)
    (g,) = torch.autograd.grad(loss, logp)
    # tokens 0 (A>0, ρ>1+ε) and 1 (A<0, ρ<1−ε) are clipped: zero gradient; token 2 is not
    assert g[0, 0] == 0 and g[0, 1] == 0 and g[0, 3] == 0
    assert torch.allclose(g[0, 2], -adv[0, 2] * rho[0, 2] / 3, atol=1e-14)
    assert math.isclose(float(metrics["ppo/clipfrac"]), 2 / 3, abs_tol=1e-12)


def test_ppo_value_loss_matches_formula() -> None:
    values = torch.tensor([[1.0, 0.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.1, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1]])
    loss, _ = ppo_value_loss(values, old, returns, mask, clip=0.2)
    vc = old + (values.detach() - old).clamp(-0.2, 0.2)
    err = torch.maximum((values.detach() - returns) ** 2, (vc - returns) ** 2)
    assert torch.allclose(loss, 0.5 * err.mean(), atol=1e-14)
    (g,) = torch.autograd.grad(loss, values)
    # token 0: clipped branch (0.7 − 2)² > (1 − 2)² wins, gradient 0; token 1: unclipped
    assert g[0, 0] == 0
    assert torch.allclose(g[0, 1], (values[0, 1] - returns[0, 1]).detach() / 3, atol=1e-14)


def test_whiten_standardises_the_masked_entries_only() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 7.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 7.0])
    want = (vals - vals.mean()) / vals.std(unbiased=False)
    out = whiten(x, mask)
    torch.testing.assert_close(out[mask.bool()], want, atol=1e-6, rtol=1e-6)
    assert (out[~mask.bool()] == 0).all()
