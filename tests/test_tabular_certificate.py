"""The one-start certificate (tabular/fast/certificate.py): its two lemmas, and on the toy's grids
that no certified problem has a better second start and that skipping changes no result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distalign.tabular.config import ToyConfig
from distalign.tabular.fast import certificate, engine


def test_kl_hessian_in_logits_is_the_weighted_variance_form() -> None:
    """vᵀ∇²KL(softmax θ‖π₀)v = Σ_l p_l (d_l + 1)(v_l − p·v)², d = ln(p/π₀) − KL, against
    autograd's Hessian (step 3 of the certificate)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        theta = 3 * torch.randn(6, generator=gen, dtype=torch.float64)
        log_ref = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)

        def kl(t: torch.Tensor, log_ref: torch.Tensor = log_ref) -> torch.Tensor:
            lp = torch.log_softmax(t, 0)
            return (lp.exp() * (lp - log_ref)).sum()

        H = torch.autograd.functional.hessian(kl, theta)
        p = torch.softmax(theta, 0)
        d = torch.log_softmax(theta, 0) - log_ref - kl(theta)
        for _ in range(5):
            v = torch.randn(6, generator=gen, dtype=torch.float64)
            form = (p * (d + 1) * (v - p @ v) ** 2).sum()
            assert torch.isclose(v @ H @ v, form, rtol=1e-10, atol=1e-12)


def test_kl_floor_is_the_smallest_kl_with_that_probability() -> None:
    """g_l(t) = min KL(p‖π₀) over p with p_l = tπ₀_l: attained by spreading the rest like π₀,
    and no random p with that p_l goes below it (step 2)."""
    rng = np.random.default_rng(0)
    log_ref = np.log(rng.dirichlet(np.ones(5)))
    pi = np.exp(log_ref)
    for t in (0.05, 0.3, 0.9):
        floor = certificate.kl_floor(np.full(5, t), log_ref)
        for l in range(5):
            rest = np.delete(np.arange(5), l)
            best = np.empty(5)
            best[l] = t * pi[l]
            best[rest] = pi[rest] * (1 - t * pi[l]) / (1 - pi[l])
            assert np.isclose((best * np.log(best / pi)).sum(), floor[l], atol=1e-14)
            for _ in range(200):
                q = np.empty(5)
                q[l] = t * pi[l]
                q[rest] = rng.dirichlet(np.ones(4)) * (1 - t * pi[l])
                assert (q * np.log(q / pi)).sum() >= floor[l] - 1e-14


def test_certified_kl_ball_keeps_every_log_ratio_above_kl_minus_one() -> None:
    """Where unique_optimum's condition holds for κ, every p with KL(p‖π₀) ≤ κ has
    ln(p_l/π₀_l) − KL > −1 (sampled near the ball's edge)."""
    rng = np.random.default_rng(1)
    log_ref = np.log(rng.dirichlet(20 * np.ones(10)))
    pi = np.exp(log_ref)
    for kappa in (0.002, 0.01):
        ok = certificate.unique_optimum(np.array([kappa]), np.zeros(1), np.ones(1),
                                        log_ref[:, None])
        assert ok[0]
        seen = 0
        for scale in (0.5, 1.0, 2.0, 4.0):
            for _ in range(2000):
                q = pi * np.exp(scale * np.sqrt(kappa) * rng.standard_normal(10))
                q /= q.sum()
                kl = (q * np.log(q / pi)).sum()
                if kl <= kappa:
                    seen += 1
                    assert (np.log(q / pi) - kl).min() > -1
        assert seen > 1000


def test_uncertifiable_inputs_are_refused() -> None:
    log_ref = np.log(np.full((4, 3), 0.25))
    ok = certificate.unique_optimum(np.array([1.0, 1.0, 1.0]), np.array([0.9, np.nan, 0.0]),
                                    np.array([0.0, 1.0, 0.5]), log_ref)
    assert not ok.any()  # c = 0; no bound on min G; κ = 2 ≥ 1


@pytest.mark.parametrize("preset", ["paper", "strong"])
def test_certified_problems_have_no_better_second_start(preset: str, monkeypatch) -> None:
    """Both starts on every problem of a sub-grid: where the first start is certified, the
    second never ends lower (beyond rounding) at another point; and the policies with the
    second start skipped equal those with both to 1e-6."""
    cfg = ToyConfig.from_preset(preset, seeds=3, ns=(32, 128, 512, 2048, 8192))
    grid = engine.Grid(cfg)
    seen = {}
    real = engine.values

    def record(obj, theta):  # every solve's values, in order: round 1, then round 2
        out = real(obj, theta)
        seen.setdefault("F", []).append(out)
        return out

    both = engine._two_starts(grid, "pmle", certify=False)
    skip = engine._two_starts(grid, "pmle", certify=True)
    assert np.abs(both - skip).max() <= 1e-6

    monkeypatch.setattr(engine, "values", record)
    engine._two_starts(grid, "pmle", certify=False)
    F = seen["F"][0]
    P = F.size // 2
    cols, beta = grid.beta_problems()
    flat = np.flatnonzero(beta == 0)
    min_g = np.full(cols.max() + 1, np.nan)
    min_g[cols[flat]] = np.minimum(F[flat], F[P + flat]) - certificate.MIN_G_MARGIN
    sure = certificate.unique_optimum(F[:P], min_g[cols], beta / cfg.contexts,
                                      grid.ref_cols[:, cols])
    assert sure.mean() > 0.2  # it does skip work
    assert (F[P:][sure] >= F[:P][sure] - 1e-10).all()
