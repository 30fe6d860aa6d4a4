"""Selection rules, grid extension, the plateau rule and the claims' statistics, on
constructed records whose right answers are known."""

from __future__ import annotations

import math

import pytest

from distalign.synthetic.adapt import converged, extension, selection_keys
from distalign.synthetic.claims import _verdict, bootstrap_mean, bootstrap_slope
from distalign.synthetic.results import select


def _run(beta: float, val: float, mass: float, kl_cond: float) -> dict:
    # kl_fwd = kl_fwd_cond − ln π̂(𝒜): the exact decomposition the leak-aware rule mirrors
    log_mass = math.log(mass)
    return {"method": "pmle", "params": {"beta": beta},
            "metrics": {"val_pref_loglik": val, "log_mass": log_mass, "kl_fwd_cond": kl_cond,
                        "kl_fwd": kl_cond - log_mass}}


def test_leak_aware_rule_refuses_the_leaky_beta_that_the_plain_rule_picks():
    # v1's failure at n = 16384: β = 0 has the best held-out likelihood (it sees only ratios)
    # but leaks 7.4 % of its mass off 𝒜; β = 0.1 keeps its mass on 𝒜.
    runs = [_run(0.0, -0.6400, 0.926, 0.070), _run(0.1, -0.6420, 0.998, 0.087),
            _run(1.0, -0.6500, 0.999, 0.150)]
    picks = select({("offline", "pmle", 16384, 0): runs})[("offline", "pmle", 16384, 0)]
    assert picks["val"]["params"] == {"beta": 0.0}
    assert picks["leak_aware"]["params"] == {"beta": 0.1}
    assert picks["oracle"]["params"] == {"beta": 0.1}
    keys = [selection_keys(r["metrics"]) for r in runs]
    assert keys[0]["leak_aware"] == pytest.approx(-0.6400 + math.log(0.926))  # −0.7169
    assert keys[1]["leak_aware"] == pytest.approx(-0.6420 + math.log(0.998))  # −0.6440
    # β = 0 is a natural edge, the interior β = 0.1 is not an edge at all
    assert picks["at_edge"] == {"val": False, "leak_aware": False, "oracle": False}
    # without leakage the two rules agree
    tight = [_run(0.0, -0.6400, 1.0, 0.07), _run(0.1, -0.6420, 1.0, 0.087)]
    both = select({("offline", "pmle", 1, 0): tight})[("offline", "pmle", 1, 0)]
    assert both["val"] is both["leak_aware"] is tight[0]


def test_grid_extension_is_log_spaced_past_the_edge_and_bounded():
    grid = [0.25, 1.0, 4.0]
    assert extension(grid, 1.0, 4.0, {}, 2) is None  # interior: nothing to do
    assert extension(grid, 4.0, 4.0, {}, 2) == ("high", 16.0)
    assert extension(grid, 0.25, 4.0, {}, 2) == ("low", 0.0625)
    assert extension(grid, 4.0, 4.0, {"high": 2}, 2) is None  # bound reached
    assert extension([0.0, 0.1, 1.0], 0.0, 4.0, {}, 2) is None  # β = 0: natural edge
    assert extension([0.0, 0.1, 1.0], 1.0, 4.0, {}, 2) == ("high", 4.0)


def test_plateau_rule():
    assert converged([0.9, 0.5, 0.304, 0.300, 0.297], window=3, tol=0.01)
    assert not converged([0.9, 0.5, 0.34, 0.32, 0.30], window=3, tol=0.01)  # still falling
    assert not converged([0.30, 0.30], window=3, tol=0.01)  # too few evaluations
    assert not converged([0.3, float("nan"), 0.3], window=3, tol=0.01)


def test_bootstrap_slope_recovers_exact_rates_and_drops_non_converged_seeds():
    sizes = [1024, 4096, 16384, 65536]
    scale = {"0": 1.0, "1": 1.3, "2": 0.8}

    def per_n(rate: float) -> dict[int, dict[str, float]]:
        return {n: {s: c * 50.0 * n**rate for s, c in scale.items()} for n in sizes}

    fast = bootstrap_slope(per_n(-1.0), points=3, resamples=300)
    # every resample of seeds has the same exact power law: slope −1, CI of width 0
    assert fast["slope"] == pytest.approx(-1.0) and fast["ci"] == pytest.approx([-1.0, -1.0])
    assert fast["sizes"] == [4096, 16384, 65536]
    assert _verdict(fast["ci"], -0.65, agree_below=True) == "agree"
    slow = bootstrap_slope(per_n(-0.3), points=3, resamples=300)
    assert slow["slope"] == pytest.approx(-0.3)
    assert _verdict(slow["ci"], -0.65, agree_below=True) == "disagree"
    # seed noise: the CI widens around the point estimate
    noisy = per_n(-1.0)
    noisy[65536]["1"] *= 3.0
    s = bootstrap_slope(noisy, points=3, resamples=500)
    assert s["ci"][0] < -1.0 < s["ci"][1] or s["ci"][0] < s["slope"] < s["ci"][1]
    assert s["ci"][1] - s["ci"][0] > 0.1
    # a size with one usable seed: a point estimate but no CI, so inconclusive
    thin = per_n(-1.0)
    thin[65536] = {"0": thin[65536]["0"]}
    t = bootstrap_slope(thin, points=3, resamples=100)
    assert math.isfinite(t["slope"]) and math.isnan(t["ci"][0])
    assert _verdict(t["ci"], -0.65, True) == "inconclusive"
    thin[65536] = {}  # none: not even a point estimate
    assert math.isnan(bootstrap_slope(thin, points=3, resamples=100)["slope"])


def test_bootstrap_mean_and_paired_verdicts():
    b = bootstrap_mean([0.10, 0.12, 0.11], resamples=1000)
    assert b["mean"] == pytest.approx(0.11)
    assert 0.10 <= b["ci"][0] <= 0.11 <= b["ci"][1] <= 0.12
    assert _verdict(b["ci"], 0.0, agree_below=False) == "agree"  # light: on-policy wins
    assert _verdict(b["ci"], 0.0, agree_below=True) == "disagree"  # standard: it should not
    assert _verdict([-0.01, 0.02], 0.0, agree_below=False) == "inconclusive"


def test_default_grid_has_the_seeds_and_sizes_a_slope_ci_needs():
    from distalign.synthetic.config import ONLINE, default_config
    from distalign.synthetic.experiment import initial_plan

    cfg = default_config()
    assert len(cfg.seeds) >= 3 and len(cfg.sizes) >= 4 and max(cfg.sizes) >= 65536
    assert cfg.reward_classes == ("standard", "light")
    plan = initial_plan(cfg)
    offline = sum(len(g["points"]) for k, g in plan.items() if k[0] == "offline")
    online = sum(len(g["points"]) for k, g in plan.items() if k[1] in ONLINE)
    assert offline == 4 * 3 * (3 + 3)  # sizes × seeds × (pmle + dpo grid points)
    # on-policy from n = 4096: sizes × seeds × classes × (distill 2 + rkl 2 + rlhf 3 + rebel 2)
    assert online == 3 * 3 * 2 * 9
    assert not any(k[2] < cfg.online_min_n for k in plan if k[1] in ONLINE)
    # the slope's range holds only sizes that every method has
    assert sorted(cfg.sizes)[-cfg.slope_points] >= cfg.online_min_n
