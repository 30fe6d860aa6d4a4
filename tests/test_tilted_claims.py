"""The tilted world's claims rules and frontier: closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distalign.tilted.claims import check_claims, frontier, method_value, verdict


def test_method_value_combines_prompt_se_and_seed_spread():
    runs = [{"m": 1.0, "m_se": 0.3}, {"m": 2.0, "m_se": 0.4}]
    v = method_value(runs, "m")
    # mean 1.5; within (0.09 + 0.16)/4 = 0.0625; between var 0.5 / 2 = 0.25
    assert v == {"mean": 1.5, "se": pytest.approx(math.sqrt(0.3125)), "seeds": 2}
    assert method_value([{"x": 1.0}], "m") is None


@pytest.mark.parametrize("d, se, rel, want", [
    (1.0, 0.1, ">", "agree"), (-1.0, 0.1, ">", "disagree"), (0.1, 0.1, ">", "inconclusive"),
    (-1.0, 0.1, "<", "agree"), (1.0, 0.1, "<", "disagree"), (0.0, math.nan, "<", "inconclusive"),
])
def test_verdict_reads_the_interval(d, se, rel, want):
    assert verdict(d, se, rel) == want


def test_claims_compare_the_named_rows():
    one = {"tilted/kl_fwd": 0.9, "tilted/kl_fwd_se": 0.01}
    two = {"tilted/kl_fwd": 0.2, "tilted/kl_fwd_se": 0.01}
    rows = check_claims({"RLHF": [one], "PMLE": [two]})
    floor = next(c for c in rows if c["a"] == "RLHF" and c["b"] == "PMLE")
    assert floor["verdict"] == "agree" and floor["difference"] == pytest.approx(0.7)
    missing = next(c for c in rows if c["b"] == "REBEL")
    assert missing["verdict"] == "inconclusive"


def test_frontier_matches_the_enumerated_tilt():
    # one prompt whose π₀ "samples" are a whole distribution given by repetition: 3 replies
    # with probabilities 1/2, 1/4, 1/4 and rewards 0, 1, −1
    r = [np.array([0.0, 0.0, 1.0, -1.0])]
    lp = [np.zeros(4)]
    beta = 0.5
    p0 = np.array([0.5, 0.25, 0.25])
    rr = np.array([0.0, 1.0, -1.0])
    q = p0 * np.exp(rr / beta)
    q /= q.sum()
    kl = float(np.sum(q * np.log(q / p0)))
    (got_kl, got_r), = frontier(lp, r, [beta])
    assert got_kl == pytest.approx(kl, rel=1e-12) and got_r == pytest.approx(float(q @ rr))
    (far_kl, far_r), = frontier(lp, r, [1e6])
    assert far_kl == pytest.approx(0.0, abs=1e-9) and far_r == pytest.approx(0.0, abs=1e-6)
