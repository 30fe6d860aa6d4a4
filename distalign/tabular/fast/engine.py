"""The toy's numpy engine: ``run_toy`` on the CPU without importing torch.

The same experiment as :mod:`distalign.tabular.reference.experiment` and the same solutions as
:mod:`distalign.tabular.reference.solvers` (``tests/test_tabular_reference.py`` holds both to
1e-6 of the frozen reference), in numpy arrays of layout ``[N, 2, S, ..., X, K]`` (sizes n,
{full, train} fit, seeds, then the β grid where there is one). Per method:

- the reward R̂ of (9), PMLE (5) and distillation (12): damped Newton (:func:`solve`: the
  compiled :mod:`.compiled` where built, else numpy's :func:`.newton.solve`, the same steps),
  PMLE and distillation from two starts (the RKL closed form and π₀), the lower objective kept
  where the starts ended apart (see :func:`distalign.tabular.reference.solvers._solve`), the
  second start skipped where :mod:`.certificate` proves the first start's optimum global;
- RLHF and RKL: their closed forms (App. B, :mod:`distalign.stats`);
- DPO: RLHF's closed form at β = τ plus one Newton step of (9), where a certificate shows that
  step is the solve (:func:`distalign.tabular.reference.solvers.dpo_policy`); elsewhere (9) is
  solved to the end first. In r = τ(θ − ln π₀) DPO's objective is (9), so its optimum is
  ln π₀ + r̂/τ;
- REBEL: its optimum δ = η(2L + ρP)⁺2LR̂ is linear in η: one K×K solve per context.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np

from distalign.stats import rkl_logits, rlhf_logits
from distalign.tabular import rules
from distalign.tabular.config import (
    GREEDY_GAP,
    TWO_STARTS,
    Clock,
    ToyConfig,
    ToyResults,
    add_records,
    finish_results,
    first_within,
    greedy_tiers,
)
from distalign.tabular.fast import certificate, newton
from distalign.tabular.world import (
    TorchRandom,
    log_sigmoid,
    log_softmax,
    make_world,
    pair_counts,
    sample_pairs,
)

CLOSED_FORM = ("rlhf", "rkl")


def exact_kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p‖q) over the last axis (0 · ln 0 = 0)."""
    p = np.exp(log_p)
    return np.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


class Grid:
    """The world, the data tables of every (n, fit, seed) and the BT reward R̂ of each."""

    def __init__(self, config: ToyConfig) -> None:
        X, K, S = config.contexts, config.responses, config.seeds
        rng = TorchRandom(config.seed)
        self.config = config
        self.world = make_world(S, X, K, config.gamma, config.logit_scale, config.mu, rng=rng)
        self.ns = sorted(config.ns)
        pairs = sample_pairs(self.world, self.ns[-1], rng)
        n_val = [max(1, round(config.val_fraction * n)) for n in self.ns]
        n_tr = [n - v for n, v in zip(self.ns, n_val, strict=True)]
        self.counts = np.stack([
            np.stack([pair_counts(pairs, 0, n, X, K), pair_counts(pairs, 0, t, X, K)])
            for n, t in zip(self.ns, n_tr, strict=True)
        ])  # [N, 2, S, X, K, K]
        self.val_counts = np.stack(
            [pair_counts(pairs, t, n, X, K) for n, t in zip(self.ns, n_tr, strict=True)])
        self.n_fit = np.broadcast_to(np.array([self.ns, n_tr], dtype=np.float64).T[..., None],
                                     (len(self.ns), 2, S))
        self.n_val = np.array(n_val, dtype=np.float64)
        self.betas = np.array(config.betas, dtype=np.float64)
        self.log_ref = self.world.log_ref  # [S, X, K]
        i, j = newton.unordered_pairs(K)
        # the held-out pairs as val_loglik reads them: wins of i over any j ≠ i, ties (a pair
        # of a response with itself), and the unordered pairs {i, j} that hold pairs
        eye = np.eye(K, dtype=bool)
        self.val_wins = (self.val_counts * ~eye).sum(-1)  # [N, S, X, K]
        self.val_ties = (self.val_counts * eye).sum((-1, -2, -3))  # [N, S]
        both = self.val_counts[..., i, j] + self.val_counts[..., j, i]  # [N, S, X, M]
        #: (n, s, x, m) of the unordered validation pairs that hold pairs, and their counts
        self.val_pairs = np.nonzero(both)
        self.val_pair_counts = both[self.val_pairs]
        won, lost = self.counts[..., i, j], self.counts[..., j, i]  # [N, 2, S, X, M]
        total = won + lost
        #: pair weights (C_ij + C_ji)/n and the share q won by j, as columns [M, D]
        self.weight = _columns(total / self.n_fit[..., None, None])
        self.share = _columns(np.where(total > 0, lost / np.maximum(total, 1), 0.0))
        self.ref_cols = _columns(np.broadcast_to(self.log_ref, self.counts.shape[:-1]))
        self.bt = newton.Objective(1.0, self.weight, self.share, np.arange(self.weight.shape[1]),
                                   ridge=config.ridge / X)
        r, _ = solve(self.bt, np.zeros((K, self.weight.shape[1])))
        r = r - r.mean(0)
        self.reward = r.T.reshape(self.counts.shape[:-1])  # [N, 2, S, X, K], centred

    def beta_problems(self) -> tuple[np.ndarray, np.ndarray]:
        """Problem layout ``[N, 2, S, B, X]`` flattened: data column and β of each."""
        N, _, S, X = self.counts.shape[:4]
        B = self.betas.size
        cols = np.arange(N * 2 * S * X).reshape(N, 2, S, 1, X)
        cols = np.broadcast_to(cols, (N, 2, S, B, X)).ravel()
        beta = np.broadcast_to(self.betas[:, None], (N, 2, S, B, X)).ravel()
        return cols, beta


def _compiled() -> ModuleType | None:
    """:mod:`.compiled` where its extension was built and may be used, else None (then
    numpy's solver runs: the same steps)."""
    if os.environ.get("DISTALIGN_TOY_COMPILED", "1") == "0":
        return None
    return _load_compiled()


@functools.cache
def _load_compiled() -> ModuleType | None:
    """Import :mod:`.compiled` once: a failed import would otherwise be retried (and
    reported) at every solve."""
    try:
        from distalign.tabular.fast import compiled
    except ModuleNotFoundError:  # not built: the CLI says so in its summary
        return None
    except (ImportError, OSError, AttributeError) as exc:  # stale or unloadable: say it once
        print(f"distalign: {exc}; using numpy's Newton solver (the same results, slower); "
              "rebuild with `pip install -e .`", file=sys.stderr)
        return None
    return compiled


def solve(obj: newton.Objective, theta0: np.ndarray, threads: int = 1
          ) -> tuple[np.ndarray, np.ndarray]:
    """The optima from ``theta0`` and how each solve ended (rules.CONVERGED, …): the
    compiled solver (:mod:`.compiled`) where it was built, else numpy's."""
    compiled = _compiled()
    if compiled is not None:
        return compiled.solve(obj, theta0, threads=threads)
    status = np.empty(theta0.shape[1], dtype=np.int8)
    theta, _ = newton.solve(obj, theta0, threads=threads, status=status)
    return theta, status


def values(obj: newton.Objective, theta: np.ndarray) -> np.ndarray:
    """F of every problem of ``obj`` at ``theta`` (``[K, P]``)."""
    compiled = _compiled()
    if compiled is not None:
        return compiled.values(obj, theta)
    return obj.at(np.arange(theta.shape[1])).value(theta)


def _columns(a: np.ndarray) -> np.ndarray:
    """``[..., M]`` → ``[M, D]`` (data columns in C order of the leading axes)."""
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)


def _expand(a: np.ndarray) -> np.ndarray:
    """``[N, 2, S, X, K]`` → ``[N, 2, S, 1, X, K]`` against the β grid."""
    return a[..., None, :, :]


def rlhf(grid: Grid, betas: np.ndarray) -> np.ndarray:
    """RLHF (1): π ∝ π₀ exp(R̂/β); β = 0 is the greedy limit (config.greedy_tiers)."""
    b = np.where(betas > 0, betas, 1.0)[:, None, None]
    soft = rlhf_logits(grid.log_ref[:, None], _expand(grid.reward), b)
    greedy = grid.log_ref - GREEDY_GAP * greedy_tiers(grid.reward)
    return log_softmax(np.where((betas > 0)[:, None, None], soft, _expand(greedy)))


def rkl(grid: Grid, betas: np.ndarray) -> np.ndarray:
    """Reverse KL (15): π ∝ π₀^{β/(β+γ)} exp(R̂/(β+γ))."""
    b = betas[:, None, None]
    return log_softmax(rkl_logits(grid.log_ref[:, None], _expand(grid.reward), b,
                                  grid.config.gamma))


def problems(grid: Grid, method: str) -> tuple[newton.Objective, np.ndarray]:
    """PMLE's (5) or distillation's (12) problems at every (n, fit, seed, β, context) from
    both starts: the objective over 2P problems, the first P from the RKL closed form and the
    next P from π₀, and their θ₀ (``[K, 2P]``).

    PMLE carries the ridge λγ² on the centred logits (see reference.solvers.pmle_policy).
    Distillation's expectation over μ is exact: 2 Σ_{i<j} μ_i μ_j KL(Bern(σ(R̂_i − R̂_j)) ‖
    Bern(σ(γ d))) per context, the target clamped as ``distill_loss`` does.
    """
    cfg = grid.config
    if method == "pmle":
        ridge = cfg.ridge * cfg.gamma**2 / cfg.contexts
        pair = {"weight": grid.weight, "share": grid.share}
    elif method == "distill":
        i, j = newton.unordered_pairs(cfg.responses)
        mu = np.exp(grid.world.log_mu)  # [S, X, K]
        weight = np.broadcast_to(2 * mu[..., i] * mu[..., j] / cfg.contexts,
                                 grid.reward.shape[:-1] + (i.size,))
        r = grid.reward[..., i] - grid.reward[..., j]
        p = np.clip(np.exp(log_sigmoid(r)), 1e-7, 1 - 1e-7)
        ridge, pair = 0.0, {"weight": _columns(weight), "share": _columns(1 - p),
                            "offset": _columns(p * np.log(p) + (1 - p) * np.log(1 - p))}
    else:
        raise ValueError(f"{method!r} has no two-start problems (pmle or distill)")
    cols, beta = grid.beta_problems()
    P = cols.size
    obj = newton.Objective(cfg.gamma, data=np.concatenate([cols, cols]), ridge=ridge,
                           kl_coef=np.concatenate([beta, beta]) / cfg.contexts,
                           log_ref=grid.ref_cols, **pair)
    start = rkl(grid, grid.betas)  # [N, 2, S, B, X, K]
    ref = np.broadcast_to(grid.log_ref[:, None], start.shape)
    return obj, np.concatenate([start.reshape(P, -1).T, ref.reshape(P, -1).T], 1)


def _two_starts(grid: Grid, method: str, certify: bool = True) -> np.ndarray:
    """Newton from the RKL closed form and from π₀; the lower objective is kept where the two
    ended apart (PMLE and distillation with β > 0 are not convex). The second start is
    skipped where :mod:`.certificate` proves the first one's optimum global (``certify``)."""
    obj, theta0 = problems(grid, method)
    cols, beta = grid.beta_problems()
    P = cols.size
    theta, status = np.empty_like(theta0), np.empty(2 * P, dtype=np.int8)
    F = np.full(2 * P, np.nan)

    def run(ids: np.ndarray) -> None:
        sub = obj.subset(ids)
        theta[:, ids], status[ids] = solve(sub, theta0[:, ids], threads=grid.config.threads)
        F[ids] = values(sub, theta[:, ids])

    if not certify:
        run(np.arange(2 * P))
    else:  # the first start everywhere, the second where β = 0 (min G) or uncertified
        flat = np.flatnonzero(beta == 0)
        run(np.concatenate([np.arange(P), P + flat]))
        ok = (status[:P] == rules.CONVERGED)
        min_g = np.full(cols.max() + 1, np.nan)
        both = flat[ok[flat] & (status[P + flat] == rules.CONVERGED)]
        min_g[cols[both]] = np.minimum(F[both], F[P + both]) - certificate.MIN_G_MARGIN
        sure = ok & certificate.unique_optimum(F[:P], min_g[cols], obj.kl_coef[:P],
                                               grid.ref_cols[:, cols])
        run(P + np.flatnonzero(~sure & (beta > 0)))
    a = theta[:, :P]
    second = np.flatnonzero(~np.isnan(F[P:]))  # the problems whose second start ran
    a2, b2 = a[:, second], theta[:, P + second]
    apart = np.abs((a2 - a2.mean(0)) - (b2 - b2.mean(0))).max(0) > rules.SAME_POINT
    lower = second[apart & (F[P + second] < F[second])]
    a[:, lower] = theta[:, P + lower]
    N, _, S, X, K = grid.reward.shape
    return log_softmax(a.T.reshape(N, 2, S, grid.betas.size, X, K))


def pmle(grid: Grid, betas: np.ndarray) -> np.ndarray:
    """PMLE (5) with β·KL, from two starts (see :func:`problems`)."""
    return _two_starts(grid, "pmle")


def distill(grid: Grid, betas: np.ndarray) -> np.ndarray:
    """Distillation (12) with β·KL, from two starts (see :func:`problems`)."""
    return _two_starts(grid, "distill")


def dpo(grid: Grid, temps: np.ndarray) -> np.ndarray:
    """DPO (6) at each temperature τ: ln π₀ + r̂/τ with r̂ the optimum of (9) (π₀ at τ = 0)."""
    K = grid.config.responses
    r = grid.reward.reshape(-1, K).T
    g, H = grid.bt.at(np.arange(r.shape[1])).grad_hess(r)
    step = newton.newton_step(g, H)
    if (-(g * step).sum(0) < rules.QUADRATIC).all():
        r_hat = r + step  # the one step the solve would take (certified quadratic regime)
    else:
        r_hat, _ = solve(grid.bt, r)
    inv_tau = np.where(temps > 0, 1.0 / np.where(temps > 0, temps, 1.0), 0.0)[:, None, None]
    r_hat = (r_hat - r_hat.mean(0)).T.reshape(grid.reward.shape)
    return log_softmax(grid.log_ref[:, None] + _expand(r_hat) * inv_tau)


def rebel(grid: Grid, etas: np.ndarray) -> np.ndarray:
    """REBEL (10) relative to π₀: δ = η(2L + ρP)⁺2LR̂, L the Laplacian of the pair weights
    C/n (ordered pairs, i ≠ j), ρ = λ/X; solved once (η = 1) per context."""
    cfg = grid.config
    K = cfg.responses
    C = grid.counts / grid.n_fit[..., None, None, None]
    W = C + np.swapaxes(C, -1, -2)
    W = W * (1 - np.eye(K))  # a pair of a response with itself carries no information
    lap = np.eye(K) * W.sum(-1)[..., None] - W
    ridge = cfg.ridge / cfg.contexts
    H = 2 * lap + ridge * (np.eye(K) - 1.0 / K)
    scale = np.abs(np.diagonal(H, 0, -2, -1)).mean(-1)[..., None, None]
    rhs = 2 * lap @ grid.reward[..., None]
    delta = np.linalg.solve(H + scale / K, rhs)[..., 0]
    delta = delta - delta.mean(-1, keepdims=True)
    return log_softmax(grid.log_ref[:, None] + etas[:, None, None] * _expand(delta))


SOLVERS: dict[str, Callable[[Grid, np.ndarray], np.ndarray]] = {
    "rlhf": rlhf, "rkl": rkl, "pmle": pmle, "distill": distill, "dpo": dpo, "rebel": rebel,
}


def val_loglik(log_pi: np.ndarray, grid: Grid) -> np.ndarray:
    """Mean held-out ln σ(γ Δ ln π̂) of the train fits ``[N, S, B, X, K]`` → ``[N, S, B]``.

    Summed per unordered pair: C_ij ln σ(γ(ℓ_i − ℓ_j)) + C_ji ln σ(γ(ℓ_j − ℓ_i)) =
    γ(C_ij ℓ_i + C_ji ℓ_j) − (C_ij + C_ji) ln(π_i^γ + π_j^γ), so one logarithm per pair
    that holds pairs and K exponentials per context (a tie, i = j, adds ln ½ per pair).
    """
    g = grid.config.gamma
    i, j = newton.unordered_pairs(grid.config.responses)
    top = log_pi.max(-1, keepdims=True)
    E = np.exp(g * (log_pi - top))  # π^γ relative to the context's largest
    n, s, x, m = grid.val_pairs
    T = E[n, s, :, x, i[m]] + E[n, s, :, x, j[m]]  # [pairs, B]
    with np.errstate(divide="ignore"):
        log_t = np.log(T)
    low = T < 1e-280  # near the subnormal range ln T loses digits: from the difference
    if low.any():
        r, b = np.nonzero(low)
        li, lj = log_pi[n[r], s[r], b, x[r], i[m[r]]], log_pi[n[r], s[r], b, x[r], j[m[r]]]
        log_t[r, b] = (g * (np.maximum(li, lj) - top[n[r], s[r], b, x[r], 0])
                       + np.log1p(np.exp(-g * np.abs(li - lj))))
    log_t += g * top[n, s, :, x, 0]
    log_t *= grid.val_pair_counts[:, None]
    # pairs come in C order, i.e. grouped by (n, s); an (n, s) may hold ties only
    N, S = grid.val_ties.shape
    group = n * S + s
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    sums = np.zeros((N * S, log_t.shape[1]))
    if starts.size:
        sums[group[starts]] = np.add.reduceat(log_t, starts, 0)
    wins = g * np.einsum("nsxk,nsbxk->nsb", grid.val_wins, log_pi)
    total = wins - sums.reshape(N, S, -1) - np.log(2.0) * grid.val_ties[..., None]
    return total / grid.n_val[:, None, None]


def method_grid(grid: Grid, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-data fits ``[N, S, B, X, K]``, their forward KL and the held-out log-likelihood of
    the train fits (both ``[N, S, B]``)."""
    log_pi = SOLVERS[method](grid, grid.betas)  # [N, 2, S, B, X, K]
    full = log_pi[:, 0]
    fkl = exact_kl(grid.world.log_star[:, None], full).mean(-1)
    val = val_loglik(log_pi[:, 1], grid)
    return full, fkl, val


def grid_metrics(config: ToyConfig, methods: tuple[str, ...] | None = None
                 ) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Forward KL and held-out log-likelihood at every β, ``[S, B]`` each, by method and n."""
    grid = Grid(config)
    out = {}
    for m in methods or config.methods:
        _, fkl, val = method_grid(grid, m)
        out[m] = {n: (fkl[a], val[a]) for a, n in enumerate(grid.ns)}
    return out


def run(config: ToyConfig, progress: Callable[[str, int], None] | None = None) -> ToyResults:
    """The whole experiment (see :func:`distalign.tabular.runner.run_toy`)."""
    t0 = time.perf_counter()
    clock = Clock()
    grid = Grid(config)
    clock.lap("newton")
    S = config.seeds
    star, ref = grid.world.log_star[:, None], grid.log_ref[:, None]
    kl_star_ref = exact_kl(grid.world.log_star, grid.log_ref).mean(-1).tolist()
    records: list[dict] = []
    for m, (full, fkl, val) in _solve_methods(grid, clock):
        pick = {"oracle": first_within(fkl, "min"), "honest": first_within(val, "max")}
        cols: dict[str, list] = {}
        for choice, idx in pick.items():
            chosen = np.take_along_axis(full, idx[..., None, None], 2)  # [N, S, 1, X, K]
            cols[f"beta_{choice}"] = grid.betas[idx[..., 0]].tolist()
            cols[f"fkl_{choice}"] = np.take_along_axis(fkl, idx, -1)[..., 0].tolist()
            cols[f"rkl_{choice}"] = exact_kl(chosen, star).mean(-1)[..., 0].tolist()
            cols[f"kl_ref_{choice}"] = exact_kl(chosen, ref).mean(-1)[..., 0].tolist()
        cols["val_loglik_honest"] = np.take_along_axis(val, pick["honest"], -1)[..., 0].tolist()
        add_records(records, m, grid.ns, S, cols, clock, progress)
    res = finish_results(config, records, kl_star_ref, t0, clock)
    res.solver = "numpy" if _compiled() is None else "compiled"
    return res


def _solve_methods(grid: Grid, clock: Clock
                   ) -> Iterator[tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(method, :func:`method_grid`) for every method; the cheap ones first, so that the
    CLI can import matplotlib beside the compiled solves, which release the GIL. The Newton
    solves of PMLE and distillation spread their problems over ``config.threads`` threads."""
    for m in sorted(grid.config.methods, key=lambda m: m in TWO_STARTS):
        out = method_grid(grid, m)
        clock.lap("closed_forms" if m in CLOSED_FORM else "newton")
        yield m, out
