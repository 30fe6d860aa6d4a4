"""The toy's shortcuts give the optima the Newton solves give (issue 8, toy speed).

DPO is taken from its certified closed form and REBEL from one solve at η = 1 (its optimum is
linear in η); the methods may be solved in threads. Each shortcut is checked here against an
independent computation on data where the comparison graphs are NOT connected (n = 12 pairs
over 4 contexts × 5 responses), the case where the closed forms of App. B do not apply.
"""

from __future__ import annotations

import pytest
import torch

from distalign.tabular import (
    FitInput,
    TorchRandom,
    ToyConfig,
    fit_reward,
    make_world,
    pair_counts,
    run_toy,
    sample_pairs,
)
from distalign.tabular.reference import solvers
from distalign.tabular.reference.newton import newton_solve
from distalign.tabular.reference.solvers import (
    dpo_objective,
    dpo_policy,
    rebel_objective,
    rebel_policy,
)

GAMMA = 0.5
GRID = torch.tensor([0.0, 1e-3, 0.05, 1.0, 20.0, 1e3], dtype=torch.float64)


@pytest.fixture(scope="module")
def sparse() -> FitInput:
    """2 seeds × 4 contexts × 5 responses from 12 pairs: most responses never compared."""
    rng = TorchRandom(3)
    world = make_world(2, 4, 5, GAMMA, 1.0, rng=rng)
    pairs = sample_pairs(world, 12, rng)
    counts = torch.from_numpy(pair_counts(pairs, 0, 12, 4, 5))
    n = torch.full((2,), 12.0, dtype=torch.float64)
    return FitInput(counts, n, torch.from_numpy(world.log_ref), torch.from_numpy(world.log_mu),
                    fit_reward(counts, n), GAMMA)


def _centred(t: torch.Tensor) -> torch.Tensor:
    return t - t.mean(-1, keepdim=True)


def test_rebel_from_one_solve_is_stationary_at_every_eta(sparse: FitInput) -> None:
    """The objective of (10) is a convex quadratic: a zero gradient is its global optimum."""
    logp = rebel_policy(sparse, GRID)
    g, _ = rebel_objective(sparse, GRID).grad_hess(logp)
    assert float(g.abs().max()) < 1e-10
    # and not trivially: without connected pairs REBEL is not RLHF at β = 1/η
    rlhf = solvers.rlhf_policy(sparse, 1.0 / GRID[1:])
    assert float((logp[:, 1:] - rlhf).abs().max()) > 1e-3


def test_rebel_equals_a_newton_solve_at_each_eta(sparse: FitInput) -> None:
    """The solve the toy made before: Newton at each η from RLHF's closed form at β = 1/η."""
    start = solvers.rlhf_policy(sparse, torch.where(GRID > 0, 1 / GRID, torch.inf))
    theta, _ = newton_solve(rebel_objective(sparse, GRID), start)
    got = rebel_policy(sparse, GRID)
    assert float((_centred(got) - _centred(theta)).abs().max()) < 1e-8


def test_dpo_closed_form_is_stationary_and_equals_the_newton_solve(
    sparse: FitInput, monkeypatch: pytest.MonkeyPatch
) -> None:
    logp = dpo_policy(sparse, GRID)
    g, _ = dpo_objective(sparse, GRID).grad_hess(logp)
    # gradient in θ is τ × that of (9) at R̂: zero to the reward fit's precision
    assert float(g.abs().max()) < 1e-10
    # with the certificate refused, the Newton solve runs, and lands on the same policy
    monkeypatch.setattr(solvers, "QUADRATIC", -1.0)
    newton = dpo_policy(sparse, GRID)
    assert float((newton - logp).abs().max()) < 1e-8


def test_threads_give_the_same_records() -> None:
    """Two threads solve the Newton methods one n at a time: other slabs, same optima to the
    toy's 1e-6 (a slab's vectorised reductions may round differently, and the ridge-held
    corner solutions of n = 32 amplify that to ~1e-9)."""
    one = run_toy(ToyConfig.from_preset("strong", seeds=2, ns=(32, 512), threads=1)).records
    two = run_toy(ToyConfig.from_preset("strong", seeds=2, ns=(32, 512), threads=2)).records
    assert len(one) == len(two) == 2 * 2 * 6
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert abs(b[key] - value) <= 1e-6 * max(1.0, abs(value)), (a, key)
            else:
                assert b[key] == value
