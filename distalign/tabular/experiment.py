"""The Figure 1 experiment (App. D.1): every method, every n, every seed, the whole β grid.

For each n the first n pairs of one long i.i.d. sample are used (nested datasets). Two fits
are made per method in one batched program: on all n pairs (for the oracle choice and the
reported numbers) and on the first 80% (train) to score each β by the preference
log-likelihood of the held-out 20%, ln σ(γ (ln π̂(a⁺|x) − ln π̂(a⁻|x))) (the honest choice).
The honest β is then used on the full-data fit, like a refit after validation.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from distalign.errors import ConfigError
from distalign.objectives import preference_logprob
from distalign.tabular.pairwise import exact_kl
from distalign.tabular.solvers import METHODS, SOLVERS, FitInput, fit_reward
from distalign.tabular.stats import loglog_slope, mean_ci
from distalign.tabular.world import World, make_world, pair_counts, sample_pairs

#: logit scale of the `strong` preset; see docs/toy.md for the reasoning
STRONG_LOGIT_SCALE = 1.0
PRESETS: dict[str, dict[str, float | int]] = {
    # the paper's App. D.1: |X| = K = 10, γ = 0.5, logits iid N(0, 0.1²), μ = π₀, n = 2^5 … 2^16
    "paper": {"contexts": 10, "responses": 10, "gamma": 0.5, "logit_scale": 0.1},
    # same world, 10× larger logits: the RLHF floor is ~100× higher, the 1/n regime is reached
    # well inside n ≤ 2^16
    "strong": {"contexts": 10, "responses": 10, "gamma": 0.5, "logit_scale": STRONG_LOGIT_SCALE},
}


def default_betas() -> tuple[float, ...]:
    """{0} ∪ 40 log-spaced values in [1e-3, 1e3] (41 values, 0.15 decade apart)."""
    return (0.0, *(10 ** (-3 + 6 * k / 39) for k in range(40)))


@dataclass(frozen=True)
class ToyConfig:
    """One run of the toy. ``ns`` are total pair counts; ``betas`` the tuned-parameter grid."""

    preset: str = "paper"
    contexts: int = 10
    responses: int = 10
    gamma: float = 0.5
    logit_scale: float = 0.1
    ns: tuple[int, ...] = tuple(2**k for k in range(5, 17))
    seeds: int = 8
    methods: tuple[str, ...] = METHODS
    betas: tuple[float, ...] = field(default_factory=default_betas)
    val_fraction: float = 0.2
    ridge: float = 1e-6
    mu: str = "ref"
    seed: int = 0
    device: str = "cpu"
    #: solver threads, each with one torch intra-op thread (torch's own threads mostly
    #: synchronise on these small batched ops); methods and sizes n are spread over them
    threads: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))

    @classmethod
    def from_preset(cls, preset: str = "paper", **overrides: object) -> ToyConfig:
        """The preset's world settings, then ``overrides`` (keys of this dataclass)."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (expected one of {', '.join(PRESETS)})")
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown toy setting(s): {', '.join(sorted(unknown))}")
        cfg = replace(cls(preset=preset, **PRESETS[preset]), **overrides)  # type: ignore[arg-type]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` with a one-line message for any invalid setting."""
        if self.contexts < 1:
            raise ConfigError(f"--contexts must be ≥ 1, got {self.contexts}")
        if self.responses < 2:
            raise ConfigError(f"--responses (K) must be ≥ 2, got {self.responses}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"--gamma must be a positive number, got {self.gamma}")
        if not (self.logit_scale >= 0 and math.isfinite(self.logit_scale)):
            raise ConfigError(f"--logit-scale must be ≥ 0, got {self.logit_scale}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be ≥ 1, got {self.seeds}")
        if not self.ns:
            raise ConfigError("no sample sizes given")
        bad = [n for n in self.ns if n < 2]
        if bad:
            raise ConfigError(f"every n must be ≥ 2 (one pair is held out), got {bad[0]}")
        twice = [n for i, n in enumerate(self.ns) if n in self.ns[:i]]
        if twice:
            raise ConfigError(f"--ns lists n = {twice[0]} twice; give each sample size once")
        unknown = [m for m in self.methods if m not in SOLVERS]
        if unknown or not self.methods:
            what = unknown[0] if unknown else "(none)"
            raise ConfigError(f"unknown method {what!r} (expected some of {', '.join(METHODS)})")
        twice = [m for i, m in enumerate(self.methods) if m in self.methods[:i]]
        if twice:
            raise ConfigError(f"--methods lists {twice[0]!r} twice; give each method once")
        if not self.betas or any(not (b >= 0 and math.isfinite(b)) for b in self.betas):
            raise ConfigError("the β grid must be non-empty and ≥ 0")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.mu not in ("ref", "uniform"):
            raise ConfigError(f"mu must be 'ref' or 'uniform', got {self.mu!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"--device must be 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be ≥ 1, got {self.threads}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: CUDA is not available here")


@dataclass
class ToyResults:
    """Per-(method, n, seed) records, their seed summaries, slopes and the world's KL(π*‖π₀)."""

    config: ToyConfig
    records: list[dict]
    kl_star_ref: list[float]
    seconds: float
    summary: list[dict] = field(default_factory=list)
    slopes: dict[str, dict[str, float]] = field(default_factory=dict)
    #: wall seconds per phase of the run (newton, closed_forms, selection); I/O adds its own
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.summary:
            self.summary = summarise(self.records, self.config)
        if not self.slopes:
            self.slopes = fit_slopes(self.records, self.config)

    def to_dict(self) -> dict:
        kl_ref = mean_ci(self.kl_star_ref)
        return {
            "config": asdict(self.config),
            "kl_star_ref": {"mean": kl_ref[0], "lo": kl_ref[1], "hi": kl_ref[2],
                            "per_seed": self.kl_star_ref},
            "slopes": self.slopes,
            "summary": self.summary,
            "records": self.records,
            "seconds": self.seconds,
            "timings": self.timings,
        }


def summarise(records: list[dict], config: ToyConfig) -> list[dict]:
    """Mean and 95% t-interval over seeds of each metric, per (method, n, β choice)."""
    out = []
    for m in config.methods:
        for n in config.ns:
            rows = [r for r in records if r["method"] == m and r["n"] == n]
            for choice in ("oracle", "honest"):
                entry: dict = {"method": m, "n": n, "choice": choice}
                for key in ("fkl", "rkl", "kl_ref", "beta"):
                    mean, lo, hi = mean_ci([r[f"{key}_{choice}"] for r in rows])
                    entry.update({key: mean, f"{key}_lo": lo, f"{key}_hi": hi})
                out.append(entry)
    return out


def fit_slopes(records: list[dict], config: ToyConfig) -> dict[str, dict[str, float]]:
    """Log-log slope of the seed-mean forward KL over the top decade of n (n ≥ n_max/10).

    Also the mean and 95% interval of the per-seed slopes.
    """
    top = [n for n in config.ns if n >= max(config.ns) / 10]
    out: dict[str, dict[str, float]] = {}
    for m in config.methods:
        for choice in ("oracle", "honest"):
            key = f"fkl_{choice}"
            by_n = {n: [r[key] for r in records if r["method"] == m and r["n"] == n] for n in top}
            mean_curve = [sum(v) / len(v) for v in by_n.values()]
            per_seed = [
                loglog_slope(top, [by_n[n][s] for n in top]) for s in range(config.seeds)
            ]
            _, lo, hi = mean_ci([s for s in per_seed if math.isfinite(s)] or [float("nan")])
            out.setdefault(m, {})[choice] = loglog_slope(top, mean_curve)
            out[m][f"{choice}_seed_lo"] = lo
            out[m][f"{choice}_seed_hi"] = hi
    out["_range"] = {"n_min": float(min(top)), "n_max": float(max(top))}
    return out


def _val_loglik(
    log_pi: Tensor, counts: Tensor, n_val: Tensor, gamma: float
) -> Tensor:
    """Mean held-out ln σ(γ Δ ln π̂) over the validation pairs: ``[..., B, X, K]`` → ``[..., B]``.

    ``counts`` (``[..., X, K, K]``) and ``n_val`` (``[...]``) carry the batch dims without B.
    """
    lp = preference_logprob(log_pi[..., :, None], log_pi[..., None, :], gamma)  # [..,B,X,K,K]
    return (counts[..., None, :, :, :] * lp).sum((-1, -2, -3)) / n_val[..., None]


def run_toy(
    config: ToyConfig, progress: Callable[[str, int], None] | None = None
) -> ToyResults:
    """Run the experiment; ``progress(method, n)`` is called for every (method, n) solved."""
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


class _Clock:
    """Accumulates wall seconds per phase: ``lap(name)`` books the time since the last lap."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self._last
        self._last = now


@dataclass
class _Grid:
    """Everything shared by the methods: the world, the data tables and the fitted reward."""

    world: World
    ns: list[int]
    betas: Tensor
    inp: FitInput
    val_counts: Tensor  # [N, S, X, K, K]
    n_val: Tensor  # [N, 1]


def _prepare(config: ToyConfig) -> _Grid:
    dev = torch.device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    world: World = make_world(config.seeds, config.contexts, config.responses, config.gamma,
                              config.logit_scale, config.mu, gen, device=dev)
    ns = sorted(config.ns)
    pairs = sample_pairs(world, ns[-1], gen)
    X, K, S = config.contexts, config.responses, config.seeds
    n_val = [max(1, round(config.val_fraction * n)) for n in ns]
    n_tr = [n - v for n, v in zip(ns, n_val, strict=True)]
    counts = torch.stack([
        torch.stack([pair_counts(pairs, 0, n, X, K), pair_counts(pairs, 0, t, X, K)])
        for n, t in zip(ns, n_tr, strict=True)
    ])  # [N, 2, S, X, K, K]
    val_counts = torch.stack(
        [pair_counts(pairs, t, n, X, K) for n, t in zip(ns, n_tr, strict=True)]
    )
    n_fit = torch.tensor([ns, n_tr], dtype=torch.float64, device=dev).T[..., None]
    n_fit = n_fit.expand(-1, 2, S)
    reward = fit_reward(counts, n_fit, config.ridge)
    inp = FitInput(counts, n_fit, world.log_ref, world.log_mu, reward, config.gamma,
                   config.ridge)
    betas = torch.tensor(config.betas, dtype=torch.float64, device=dev)
    n_val_t = torch.tensor(n_val, dtype=torch.float64, device=dev)[:, None]
    return _Grid(world, ns, betas, inp, val_counts, n_val_t)


def _method_grid(
    grid: _Grid, method: str, gamma: float, clock: _Clock | None = None,
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
    fkl = exact_kl(grid.world.log_star[:, None], full).mean(-1)  # E_x over uniform contexts
    val = _val_loglik(log_pi[:, 1], grid.val_counts[part], grid.n_val[part], gamma)
    return full, fkl, val


def grid_metrics(
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
    grid: _Grid, config: ToyConfig, clock: _Clock
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
    clock = _Clock()
    grid = _prepare(config)
    clock.lap("newton")
    world, ns, betas = grid.world, grid.ns, grid.betas
    X, K, S = config.contexts, config.responses, config.seeds
    star = world.log_star[:, None]  # [S, 1, X, K] against [..., S, B, X, K]
    ref = world.log_ref[:, None]
    kl_star_ref = exact_kl(world.log_star, world.log_ref).mean(-1).tolist()
    records: list[dict] = []
    for m, (full, fkl, val) in _solve_methods(grid, config, clock):
        pick = {"oracle": fkl.argmin(-1, keepdim=True), "honest": val.argmax(-1, keepdim=True)}
        cols: dict[str, list] = {}
        for choice, idx in pick.items():
            chosen = full.gather(2, idx[..., None, None].expand(-1, -1, 1, X, K))  # [N,S,1,X,K]
            cols[f"beta_{choice}"] = betas[idx[..., 0]].tolist()
            cols[f"fkl_{choice}"] = fkl.gather(-1, idx)[..., 0].tolist()
            cols[f"rkl_{choice}"] = exact_kl(chosen, star).mean(-1)[..., 0].tolist()
            cols[f"kl_ref_{choice}"] = exact_kl(chosen, ref).mean(-1)[..., 0].tolist()
        cols["val_loglik_honest"] = val.gather(-1, pick["honest"])[..., 0].tolist()
        for a, n in enumerate(ns):
            for s in range(S):
                rec: dict = {"method": m, "n": n, "seed": s}
                rec.update({key: v[a][s] for key, v in cols.items()})
                records.append(rec)
        clock.lap("selection")
        if progress is not None:
            for n in ns:
                progress(m, n)
    # records by n, then method, then seed (a stable sort keeps the seeds in order)
    records.sort(key=lambda r: (r["n"], config.methods.index(r["method"])))
    res = ToyResults(config, records, kl_star_ref, time.perf_counter() - t0)
    clock.lap("selection")
    res.timings = clock.totals
    return res
