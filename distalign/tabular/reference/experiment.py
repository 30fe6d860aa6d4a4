"""The Figure 1 experiment (App. D.1) on the torch reference engine: every method, every n,
every seed, the whole β grid (``run_toy`` with ``engine="torch"`` or a CUDA device).

For each n the first n pairs of one long i.i.d. sample are used (nested datasets). Two fits
are made per method in one batched program: on all n pairs (for the oracle choice and the
reported numbers) and on the first 80% (train) to score each β by the preference
log-likelihood of the held-out 20%, ln σ(γ (ln π̂(a⁺|x) − ln π̂(a⁻|x))) (the honest choice).
The honest β is then used on the full-data fit, like a refit after validation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from distalign.objectives import preference_logprob
from distalign.tabular.config import (
    Clock,
    ToyConfig,
    ToyResults,
    add_records,
    finish_results,
    first_within,
)
from distalign.tabular.reference.pairwise import exact_kl
from distalign.tabular.reference.solvers import SOLVERS, FitInput, fit_reward
from distalign.tabular.world import TorchRandom, make_world, pair_counts, sample_pairs


def _val_loglik(
    log_pi: Tensor, counts: Tensor, n_val: Tensor, gamma: float
) -> Tensor:
    """Mean held-out ln σ(γ Δ ln π̂) over the validation pairs: ``[..., B, X, K]`` → ``[..., B]``.

    ``counts`` (``[..., X, K, K]``) and ``n_val`` (``[...]``) carry the batch dims without B.
    """
    lp = preference_logprob(log_pi[..., :, None], log_pi[..., None, :], gamma)  # [..,B,X,K,K]
    return (counts[..., None, :, :, :] * lp).sum((-1, -2, -3)) / n_val[..., None]


def run_torch(
    config: ToyConfig, progress: Callable[[str, int], None] | None = None
) -> ToyResults:
    """:func:`~distalign.tabular.runner.run_toy` with the torch engine (any device)."""
    config.validate()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, progress)
    finally:
        torch.set_num_threads(old_threads)


#: methods solved in closed form (the rest are Newton solves)
CLOSED_FORM = ("rlhf", "rkl")
#: methods whose whole grid costs well under a second (closed forms and certified shortcuts)
CHEAP = (*CLOSED_FORM, "dpo", "rebel")


@dataclass
class _Grid:
    """Everything shared by the methods: the world's π* and π₀, the data tables and the fitted
    reward."""

    log_star: Tensor  # [S, X, K]
    log_ref: Tensor
    ns: list[int]
    betas: Tensor
    inp: FitInput
    val_counts: Tensor  # [N, S, X, K, K]
    n_val: Tensor  # [N, 1]


def _prepare(config: ToyConfig) -> _Grid:
    """The world and data of :mod:`distalign.tabular.world` (the numpy engine's, draw for
    draw) as tensors on ``config.device``."""
    dev = torch.device(config.device)
    rng = TorchRandom(config.seed)
    world = make_world(config.seeds, config.contexts, config.responses, config.gamma,
                       config.logit_scale, config.mu, rng=rng)
    ns = sorted(config.ns)
    pairs = sample_pairs(world, ns[-1], rng)
    X, K, S = config.contexts, config.responses, config.seeds

    def counts_of(start: int, stop: int) -> Tensor:
        return torch.from_numpy(pair_counts(pairs, start, stop, X, K)).to(dev)

    def table(a: object) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float64, device=dev)

    n_val = [max(1, round(config.val_fraction * n)) for n in ns]
    n_tr = [n - v for n, v in zip(ns, n_val, strict=True)]
    counts = torch.stack([torch.stack([counts_of(0, n), counts_of(0, t)])
                          for n, t in zip(ns, n_tr, strict=True)])  # [N, 2, S, X, K, K]
    val_counts = torch.stack([counts_of(t, n) for n, t in zip(ns, n_tr, strict=True)])
    n_fit = torch.tensor([ns, n_tr], dtype=torch.float64, device=dev).T[..., None]
    n_fit = n_fit.expand(-1, 2, S)
    reward = fit_reward(counts, n_fit, config.ridge)
    log_ref = table(world.log_ref)
    inp = FitInput(counts, n_fit, log_ref, table(world.log_mu), reward, config.gamma,
                   config.ridge)
    betas = torch.tensor(config.betas, dtype=torch.float64, device=dev)
    n_val_t = torch.tensor(n_val, dtype=torch.float64, device=dev)[:, None]
    return _Grid(table(world.log_star), log_ref, ns, betas, inp, val_counts, n_val_t)


def _method_grid(
    grid: _Grid, method: str, gamma: float, clock: Clock | None = None,
    part: slice = slice(None),
) -> tuple[Tensor, Tensor, Tensor]:
    """Full-data fits ``[N, S, B, X, K]``, their forward KL and the held-out log-likelihood of
    the train fits (both ``[N, S, B]``) of one method over the grid (the sizes n in ``part``)."""
    inp = grid.inp
    if part != slice(None):  # every problem is independent: a slice of n is a smaller grid
        inp = replace(inp, counts=inp.counts[part], n=inp.n[part], reward=inp.reward[part])
    log_pi = SOLVERS[method](inp, grid.betas)  # [N, 2, S, B, X, K]: full fit, train fit
    if clock is not None:
        clock.lap("closed_forms" if method in CLOSED_FORM else "newton")
    full = log_pi[:, 0]
    fkl = exact_kl(grid.log_star[:, None], full).mean(-1)  # E_x over uniform contexts
    val = _val_loglik(log_pi[:, 1], grid.val_counts[part], grid.n_val[part], gamma)
    return full, fkl, val


def grid_metrics_torch(
    config: ToyConfig, methods: tuple[str, ...] | None = None
) -> dict[str, dict[int, tuple[Tensor, Tensor]]]:
    """Forward KL (full fit) and held-out log-likelihood (train fit) at every β, ``[S, B]``
    each, by method and n: the curves the oracle and honest choices pick from."""
    config.validate()
    grid = _prepare(config)
    out: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    for m in methods or config.methods:
        _, fkl, val = _method_grid(grid, m, config.gamma)
        out[m] = {n: (fkl[a], val[a]) for a, n in enumerate(grid.ns)}
    return out


def _solve_methods(
    grid: _Grid, config: ToyConfig, clock: Clock
) -> Iterator[tuple[str, tuple[Tensor, Tensor, Tensor]]]:
    """(method, :func:`_method_grid` result) for every method, as they finish.

    With ``config.threads`` > 1 the work is spread over that many threads; torch releases
    the GIL inside its kernels, so the solves overlap. The Newton methods are cut into one
    task per n (costliest, smallest n, first) so that the threads stay balanced; the caller's
    work on a finished method (selection) overlaps the solves of the others.
    """
    if config.threads == 1:
        for m in config.methods:
            yield m, _method_grid(grid, m, config.gamma, clock)
        return
    cheap = [m for m in config.methods if m in CHEAP]
    costly = [m for m in config.methods if m not in CHEAP]
    tasks = [(m, slice(None)) for m in cheap]
    tasks += [(m, slice(a, a + 1)) for a in range(len(grid.ns)) for m in costly]
    with ThreadPoolExecutor(config.threads, thread_name_prefix="toy") as pool:
        futures: dict[str, list[Future]] = {m: [] for m in config.methods}
        for m, part in tasks:
            futures[m].append(pool.submit(_method_grid, grid, m, config.gamma, None, part))
        pending = list(config.methods)
        while pending:
            done = [m for m in pending if all(f.done() for f in futures[m])]
            if not done:
                running = [f for m in pending for f in futures[m] if not f.done()]
                wait(running, return_when=FIRST_COMPLETED)  # the done ones would not block
                continue
            for m in done:
                pending.remove(m)
                pieces = [f.result() for f in futures[m]]
                clock.lap("newton")  # the wall time spent waiting on the solves
                yield m, tuple(torch.cat(x) for x in zip(*pieces, strict=True))


def _run(config: ToyConfig, progress: Callable[[str, int], None] | None) -> ToyResults:
    """Every n, fit, seed, β and context of one method is one batched solve.

    Batch layout: ``[N, 2, S]`` (sizes n, {full, train} fit, seeds), then ``[B, X, K]``.
    """
    t0 = time.perf_counter()
    clock = Clock()
    grid = _prepare(config)
    clock.lap("newton")
    ns, betas = grid.ns, grid.betas
    X, K, S = config.contexts, config.responses, config.seeds
    star = grid.log_star[:, None]  # [S, 1, X, K] against [..., S, B, X, K]
    ref = grid.log_ref[:, None]
    kl_star_ref = exact_kl(grid.log_star, grid.log_ref).mean(-1).tolist()
    records: list[dict] = []
    for m, (full, fkl, val) in _solve_methods(grid, config, clock):
        pick = {"oracle": _first_within(fkl, "min"), "honest": _first_within(val, "max")}
        cols: dict[str, list] = {}
        for choice, idx in pick.items():
            chosen = full.gather(2, idx[..., None, None].expand(-1, -1, 1, X, K))  # [N,S,1,X,K]
            cols[f"beta_{choice}"] = betas[idx[..., 0]].tolist()
            cols[f"fkl_{choice}"] = fkl.gather(-1, idx)[..., 0].tolist()
            cols[f"rkl_{choice}"] = exact_kl(chosen, star).mean(-1)[..., 0].tolist()
            cols[f"kl_ref_{choice}"] = exact_kl(chosen, ref).mean(-1)[..., 0].tolist()
        cols["val_loglik_honest"] = val.gather(-1, pick["honest"])[..., 0].tolist()
        add_records(records, m, ns, S, cols, clock, progress)
    res = finish_results(config, records, kl_star_ref, t0, clock)
    res.solver = "torch"
    return res


def _first_within(values: Tensor, best: str) -> Tensor:
    """:func:`~distalign.tabular.config.first_within` on a tensor (same index, same device)."""
    idx = first_within(values.detach().cpu().double().numpy(), best)
    return torch.from_numpy(idx).to(values.device)
