"""The paper's claim in the `strong` toy world: distribution-learning methods reach O(1/n),
RLHF plateaus (the paper's Figure 1)."""

from __future__ import annotations

import pytest

from distalign.errors import ConfigError
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


def test_summary_has_intervals_around_the_mean(strong) -> None:
    for row in strong.summary:
        assert row["fkl_lo"] <= row["fkl"] <= row["fkl_hi"]
    assert len(strong.records) == 4 * 4 * 8


@pytest.mark.parametrize(
    "override",
    [{"ns": (0,)}, {"responses": 1}, {"gamma": 0.0}, {"methods": ("ppo",)}, {"seeds": 0}],
)
def test_bad_settings_raise_config_error(override: dict) -> None:
    with pytest.raises(ConfigError):
        ToyConfig.from_preset("paper", **override)
