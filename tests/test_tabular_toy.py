"""The paper's claim in the `strong` toy world: distribution-learning methods reach O(1/n),
RLHF plateaus (the paper's Figure 1)."""

from __future__ import annotations

import math
import statistics

import pytest

from distalign.errors import ConfigError
from distalign.stats import mean_ci, t_quantile
from distalign.tabular import ToyConfig, run_toy


@pytest.fixture(scope="module")
def strong():
    cfg = ToyConfig.from_preset(
        "strong", ns=(2**13, 2**14, 2**15, 2**16), methods=("rlhf", "rkl", "pmle", "distill")
    )
    return run_toy(cfg)


def _fkl(res, method: str, n: int, choice: str = "oracle") -> float:
    row = [r for r in res.summary if (r["method"], r["n"], r["choice"]) == (method, n, choice)]
    return row[0]["fkl"]


@pytest.mark.parametrize("method", ["rkl", "pmle", "distill"])
def test_distribution_learning_beats_rlhf_by_5x_at_largest_n(strong, method: str) -> None:
    assert _fkl(strong, method, 2**16) * 5 <= _fkl(strong, "rlhf", 2**16)


@pytest.mark.parametrize("method", ["rkl", "pmle", "distill"])
def test_distribution_learning_slope_is_about_minus_one(strong, method: str) -> None:
    assert -1.3 <= strong.slopes[method]["oracle"] <= -0.7


def test_rlhf_plateaus(strong) -> None:
    assert strong.slopes["rlhf"]["oracle"] > -0.3
    assert _fkl(strong, "rlhf", 2**16) > 0.1 * sum(strong.kl_star_ref) / len(strong.kl_star_ref)


def test_honest_choice_keeps_the_separation(strong) -> None:
    for m in ("rkl", "pmle", "distill"):
        assert _fkl(strong, m, 2**16, "honest") * 5 <= _fkl(strong, "rlhf", 2**16, "honest")


# Student's t 0.975 quantiles from a printed table (independent of distalign.stats)
T_975 = {1: 12.706204736174707, 2: 4.302652729749464, 7: 2.3646242515927847,
         30: 2.0422724563012373}


def test_summary_is_the_seed_mean_and_its_t_interval(strong) -> None:
    """Every summary number recomputed from the records: the mean over the 8 seeds and
    mean ± t₀.₉₇₅(7)·sd/√8, with the quantile from the table above."""
    assert len(strong.records) == 4 * 4 * 8
    assert len(strong.summary) == 4 * 4 * 2
    for row in strong.summary:
        rows = [r for r in strong.records if (r["method"], r["n"]) == (row["method"], row["n"])]
        assert len(rows) == 8
        for key in ("fkl", "rkl", "kl_ref", "beta"):
            values = [r[f"{key}_{row['choice']}"] for r in rows]
            mean = statistics.fmean(values)
            half = T_975[7] * statistics.stdev(values) / math.sqrt(8)
            scale = max(abs(mean), 1e-12)
            assert abs(row[key] - mean) <= 1e-12 * scale
            assert abs(row[f"{key}_lo"] - (mean - half)) <= 1e-9 * scale
            assert abs(row[f"{key}_hi"] - (mean + half)) <= 1e-9 * scale
        assert row["fkl_lo"] < row["fkl"] < row["fkl_hi"]  # seeds differ: a real interval


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_table(df: int) -> None:
    assert abs(t_quantile(0.975, df) - T_975[df]) <= 1e-9 * T_975[df]


def test_mean_ci_of_two_values() -> None:
    mean, lo, hi = mean_ci([1.0, 3.0])  # sd = √2 and n = 2: half-width t₀.₉₇₅(1)
    assert mean == 2.0
    assert math.isclose(lo, 2.0 - T_975[1], rel_tol=1e-9)
    assert math.isclose(hi, 2.0 + T_975[1], rel_tol=1e-9)


@pytest.mark.parametrize(
    "override",
    [{"ns": (0,)}, {"responses": 1}, {"gamma": 0.0}, {"methods": ("ppo",)}, {"seeds": 0}],
)
def test_bad_settings_raise_config_error(override: dict) -> None:
    with pytest.raises(ConfigError):
        ToyConfig.from_preset("paper", **override)
