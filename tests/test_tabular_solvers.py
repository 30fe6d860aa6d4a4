"""Tabular solvers: closed forms vs gradient-based optima, Newton vs autograd, equivalences."""

from __future__ import annotations

import pytest
import torch

from distalign.objectives import pmle_loss
from distalign.tabular import (
    FitInput,
    TorchRandom,
    distill_policy,
    dpo_policy,
    exact_kl,
    fit_reward,
    make_world,
    pair_counts,
    pmle_policy,
    rebel_policy,
    rkl_policy,
    rlhf_policy,
    sample_pairs,
)
from distalign.tabular.reference.newton import newton_solve
from distalign.tabular.reference.pairwise import (
    ClosedForm,
    PairDerivativeError,
    PairwiseObjective,
    kl_grad_hess,
    pair_index,
)
from distalign.tabular.reference.solvers import SOLVERS, _softplus_neg

GAMMA = 0.5


@pytest.fixture(scope="module")
def data() -> FitInput:
    """3 seeds × 4 contexts × 5 responses, 4096 pairs: every pair is compared (connected)."""
    rng = TorchRandom(11)
    world = make_world(3, 4, 5, GAMMA, 1.0, rng=rng)
    pairs = sample_pairs(world, 4096, rng)
    counts = torch.from_numpy(pair_counts(pairs, 0, 4096, 4, 5))
    n = torch.full((3,), 4096.0, dtype=torch.float64)
    reward = fit_reward(counts, n)
    return FitInput(counts, n, torch.from_numpy(world.log_ref), torch.from_numpy(world.log_mu),
                    reward, GAMMA)


BETAS = torch.tensor([0.05, 0.5, 3.0], dtype=torch.float64)


def _lbfgs(objective, shape: tuple[int, ...]) -> torch.Tensor:
    """Minimise a function of logits with torch's L-BFGS (strong Wolfe) from zero logits."""
    theta = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-14,
                            tolerance_change=1e-16, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(torch.log_softmax(theta, -1)).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return torch.softmax(theta.detach(), -1)


@pytest.mark.parametrize("method", ["rlhf", "rkl"])
def test_closed_forms_are_the_optima_of_objectives_1_and_15(data: FitInput, method: str) -> None:
    """RLHF (1) and RKL (15) with exact expectations; the closed forms of App. B."""
    betas = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)  # π not too peaked for L-BFGS
    r = data.reward[:, None]  # [S, 1, X, K]
    ref = data.log_ref[:, None]
    b = betas[:, None]  # aligns with [S, B, X]
    ent = GAMMA if method == "rkl" else 0.0

    def objective(logp: torch.Tensor) -> torch.Tensor:
        p = logp.exp()
        # −E_π R̂ − γ H(π) + β KL(π‖π₀), per context
        return -(p * r).sum(-1) + ent * (p * logp).sum(-1) + b * exact_kl(logp, ref)

    numeric = _lbfgs(objective, (3, 3, 4, 5))
    closed = SOLVERS[method](data, betas).exp()
    assert (numeric - closed).abs().max() < 1e-6


def test_kl_grad_hess_matches_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2
    ref = torch.log_softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    gk, hk = kl_grad_hess(theta, ref)
    def f(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return exact_kl(torch.log_softmax(t, -1), r)

    for i in range(4):
        assert torch.allclose(gk[i], torch.func.grad(f)(theta[i], ref[i]), atol=1e-12)
        assert torch.allclose(hk[i], torch.func.hessian(f)(theta[i], ref[i]), atol=1e-12)


def test_newton_derivatives_match_autograd_of_library_objective(data: FitInput) -> None:
    """The hand-assembled chain rule equals autograd through pmle_loss + β·KL + ridge."""
    pairs = pair_index(5)
    w = (data.counts / data.n[:, None, None, None])[..., pairs[0], pairs[1]]  # [S, X, M]
    beta, ridge = 0.2, 1e-3

    def pair(d: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return pmle_loss(d, torch.zeros_like(d), GAMMA, weight)[0]

    obj = PairwiseObjective(pair, pairs, w, kl_coef=beta, log_ref=data.log_ref, ridge=ridge)
    theta = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def F(t: torch.Tensor, s: int, x: int) -> torch.Tensor:
        logp = torch.log_softmax(t, -1)
        c, r = logp[pairs[0]], logp[pairs[1]]  # library call on real log-probabilities
        data_term = pmle_loss(c, r, GAMMA, w[s, x])[0] * w[s, x].sum()
        dev = t - t.mean()
        kl = exact_kl(logp, data.log_ref[s, x])
        return data_term + beta * kl + 0.5 * ridge * (dev * dev).sum()

    g, H = obj.grad_hess(theta)
    values = obj.value(theta)
    for s in range(3):
        for x in range(4):
            t = theta[s, x]
            assert torch.allclose(values[s, x], F(t, s, x), atol=1e-13)
            assert torch.allclose(g[s, x], torch.func.grad(F)(t, s, x), atol=1e-12)
            assert torch.allclose(H[s, x], torch.func.hessian(F)(t, s, x), atol=1e-11)


def test_newton_solution_is_stationary_for_pmle(data: FitInput) -> None:
    logp = pmle_policy(data, BETAS)  # [S, B, X, K]
    pairs = pair_index(5)
    w = (data.counts / data.n[:, None, None, None])[..., pairs[0], pairs[1]][:, None]

    def pair(d: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return pmle_loss(d, torch.zeros_like(d), GAMMA, weight)[0]

    obj = PairwiseObjective(pair, pairs, w, kl_coef=BETAS[:, None] / 4,
                            log_ref=data.log_ref[:, None], ridge=data.ridge * GAMMA**2 / 4)
    g, _ = obj.grad_hess(logp)
    assert g.abs().max() < 1e-9


def test_dpo_optimum_is_rlhf_closed_form(data: FitInput) -> None:
    """Tabular DPO (6) at temperature τ lands on π ∝ π₀ exp(R̂/τ) (same ridge as (9))."""
    assert (dpo_policy(data, BETAS).exp() - rlhf_policy(data, BETAS).exp()).abs().max() < 1e-6


def test_dpo_at_zero_temperature_is_reference(data: FitInput) -> None:
    zero = torch.zeros(1, dtype=torch.float64)
    assert (dpo_policy(data, zero)[:, 0] - data.log_ref).abs().max() < 1e-9


def test_pmle_and_distill_at_beta_zero_are_the_rkl_solution(data: FitInput) -> None:
    """At β = 0 PMLE (4) and distillation (11) both reach π ∝ exp(R̂/γ) = RKL (15) at β = 0."""
    zero = torch.zeros(1, dtype=torch.float64)
    target = rkl_policy(data, zero).exp()
    assert (pmle_policy(data, zero).exp() - target).abs().max() < 1e-6
    assert (distill_policy(data, zero).exp() - target).abs().max() < 1e-6


def test_rebel_with_connected_pairs_is_rlhf_at_inverse_eta(data: FitInput) -> None:
    etas = 1.0 / BETAS
    diff = (rebel_policy(data, etas).exp() - rlhf_policy(data, BETAS).exp()).abs().max()
    assert diff < 1e-4  # only the 1e-6 ridge on ln(π/π₀) separates them


def test_reward_fit_recovers_gamma_log_pi_star() -> None:
    """With many pairs the BT MLE (9) approaches R* = γ ln π* (centred)."""
    rng = TorchRandom(5)
    world = make_world(1, 2, 4, GAMMA, 1.0, rng=rng)
    pairs = sample_pairs(world, 400_000, rng)
    counts = torch.from_numpy(pair_counts(pairs, 0, 400_000, 2, 4))
    r = fit_reward(counts, torch.tensor([400_000.0], dtype=torch.float64))
    star = GAMMA * torch.from_numpy(world.log_star)
    star = star - star.mean(-1, keepdim=True)
    assert (r - star).abs().max() < 0.03


@pytest.mark.parametrize("method", ["rlhf", "rkl", "pmle", "distill", "dpo", "rebel"])
def test_solvers_return_normalised_policies_for_the_whole_grid(
    data: FitInput, method: str
) -> None:
    grid = torch.tensor([0.0, 0.01, 1.0, 100.0], dtype=torch.float64)
    logp = SOLVERS[method](data, grid)
    assert logp.shape == (3, 4, 4, 5)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 4, 4, dtype=torch.float64))
    far = 0 if method == "rebel" else 3  # η = 0, or β (τ) = 100: every method is near π₀
    assert exact_kl(logp[:, far], data.log_ref).max() < 0.02


def _pmle_objective(data: FitInput, closed: ClosedForm | None) -> PairwiseObjective:
    pairs = pair_index(5)
    w = (data.counts / data.n[:, None, None, None])[..., pairs[0], pairs[1]][:, None]

    def pair(d: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return pmle_loss(d, torch.zeros_like(d), GAMMA, weight)[0]

    return PairwiseObjective(pair, pairs, w, kl_coef=BETAS[:, None] / 4,
                             log_ref=data.log_ref[:, None], ridge=1e-6, closed=closed)


def test_a_closed_form_that_is_not_the_library_loss_is_refused(data: FitInput) -> None:
    """ψ of γ = 1 where the library call uses γ = 0.5: the solve stops before any step."""

    def derivs(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.sigmoid(-d)
        return -s, s * (1 - s)

    wrong = ClosedForm(lambda d: torch.nn.functional.softplus(-d), derivs)
    theta0 = data.log_ref[:, None].expand(3, 3, 4, 5)
    with pytest.raises(PairDerivativeError, match="differs from the library"):
        newton_solve(_pmle_objective(data, wrong), theta0)


def test_closed_forms_give_the_autograd_solution_and_slabs_do_not_matter(data: FitInput) -> None:
    """Newton with the closed-form ψ′, ψ″ (cut into 1-problem slabs) equals Newton with
    autograd through pmle_loss (one slab)."""
    theta0 = data.log_ref[:, None].expand(3, 3, 4, 5)
    fast, _ = newton_solve(_pmle_objective(data, _softplus_neg(GAMMA)), theta0, slab=1)
    slow, _ = newton_solve(_pmle_objective(data, None), theta0)
    assert (fast - slow).abs().max() < 1e-9
