"""The toy's settings and results, without torch: the CLI's toy path imports only numpy.

:class:`ToyConfig` (presets, β grid, validation), :class:`ToyResults` and their seed summaries
and slopes. The solves are in :mod:`distalign.tabular.fast` (numpy, the default on CPU) and
:mod:`distalign.tabular.reference` (torch, for ``engine="torch"`` or a CUDA device).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from distalign.errors import ConfigError
from distalign.stats import loglog_slope, mean_ci

#: the methods in the order of the paper's Table 1 / Figure legend
METHODS = ("rlhf", "rkl", "pmle", "distill", "dpo", "rebel")
#: the non-convex Newton solves (two starts); the numpy engine runs them after the others
TWO_STARTS = ("pmle", "distill")
#: solver engines: numpy (CPU, no torch import) or the torch tensor programs
ENGINES = ("auto", "numpy", "torch")

#: two selection criteria closer than this are tied and go to the smaller β: a closer race is
#: decided by rounding (R̂ is exact to ~1e-11, and a small β or a large η multiplies that)
TIE = 1e-9
#: rewards R̂ closer than this are one tier of the greedy (β = 0) RLHF policy (R̂'s own error
#: is ~1e-11: responses that no pair tells apart tie exactly in exact arithmetic)
REWARD_TIE = 1e-8
#: the greedy policy puts each lower tier this many nats below the one above: no mass after
#: exp, and ln π₀ ratios within a tier kept to ~1e-13 (β = 1e-12 lost them to rounding)
GREEDY_GAP = 1000.0

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
    #: solver threads (numpy and torch release the GIL inside their kernels); methods and
    #: sizes n are spread over them
    threads: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    #: "numpy" (CPU only, no torch import: the fast path), "torch" (any device) or "auto"
    #: (numpy on the CPU, torch elsewhere)
    engine: str = "auto"

    @property
    def solver_engine(self) -> str:
        """The engine that runs: ``engine`` with "auto" resolved by the device."""
        if self.engine != "auto":
            return self.engine
        return "numpy" if self.device == "cpu" else "torch"

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
        unknown = [m for m in self.methods if m not in METHODS]
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
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "numpy" and self.device != "cpu":
            raise ConfigError(f"--device {self.device}: the numpy engine runs on the CPU only")
        if self.device.startswith("cuda") and not _cuda_available():
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
    #: which Newton solver ran: "compiled" (tabular/fast/_newton.c), "numpy" or "torch"
    solver: str = ""

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
            "solver": self.solver,
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


def greedy_tiers(reward: np.ndarray) -> np.ndarray:
    """Tier of each reward along the last axis: 0 for the best, one more per lower group of
    rewards that chain within :data:`REWARD_TIE`. The greedy policy (RLHF's β → 0⁺ limit) is
    π₀ on tier 0; its ln π is ln π₀ − GREEDY_GAP·tier, up to normalisation."""
    order = np.argsort(-reward, -1, kind="stable")
    s = np.take_along_axis(reward, order, -1)
    drop = (s[..., :-1] - s[..., 1:]) >= REWARD_TIE
    tier = np.concatenate([np.zeros_like(s[..., :1]), np.cumsum(drop, -1)], -1)
    out = np.empty_like(tier)
    np.put_along_axis(out, order, tier, -1)
    return out


def first_within(values: np.ndarray, best: str) -> np.ndarray:
    """``[..., B]`` → ``[..., 1]``: the first grid index (smallest β) whose value is within
    :data:`TIE` of the best (``best`` is "min" or "max"). A plain argmax let rounding pick
    among tied β values (at n = 32 the held-out pairs often see only contexts where several
    β give the same policy)."""
    v = values if best == "max" else -values
    return np.argmax(v >= v.max(-1, keepdims=True) - TIE, axis=-1)[..., None]


def add_records(records: list[dict], method: str, ns: list[int] | tuple[int, ...],
                seeds: int, cols: dict[str, list], clock: Clock, progress=None) -> None:
    """One record per (n, seed) of ``method`` from columns laid out ``[n][seed]`` (both
    engines build the same records, so the tables and tests read either)."""
    for a, n in enumerate(ns):
        for s in range(seeds):
            rec: dict = {"method": method, "n": n, "seed": s}
            rec.update({key: v[a][s] for key, v in cols.items()})
            records.append(rec)
    clock.lap("selection")
    if progress is not None:
        for n in ns:
            progress(method, n)


def finish_results(config: ToyConfig, records: list[dict], kl_star_ref: float, t0: float,
                   clock: Clock) -> ToyResults:
    """Records by n, then method, then seed (a stable sort keeps the seeds in order)."""
    records.sort(key=lambda r: (r["n"], config.methods.index(r["method"])))
    res = ToyResults(config, records, kl_star_ref, time.perf_counter() - t0)
    clock.lap("selection")
    res.timings = clock.totals
    return res


class Clock:
    """Accumulates wall seconds per phase: ``lap(name)`` books the time since the last lap."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self._last
        self._last = now


def _cuda_available() -> bool:
    import torch  # only for a CUDA device: the CPU toy path must not pay for the import

    return bool(torch.cuda.is_available())
