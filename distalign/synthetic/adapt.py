"""The two rules that adapt the grid between rounds of ``distalign synthetic``.

- **Convergence first** (``converged``): an on-policy run has converged when its objective gap
  (``metrics.objective_gap``, exact over the prompt distribution) varies by at most ``tol``
  nats over its last ``window`` evaluations. One that has not is retrained with a larger step
  budget, a bounded number of times; if it still has not, it is reported and kept out of the
  claims' evidence.
- **β grids that contain their optimum** (``extension``): when the leak-aware choice is the
  smallest or largest value of the searched hyper-parameter, the grid gets one more point past
  that edge, log-spaced (× or ÷ ``factor``), a bounded number of times per side. 0 is a
  natural lower edge (β = 0 is the unregularised estimator itself) and is not extended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from distalign.synthetic.config import ONLINE, SEARCHED, SyntheticConfig


def converged(curve: Sequence[float], window: int, tol: float) -> bool:
    """max − min of the last ``window`` values ≤ ``tol`` (False with fewer values or a NaN)."""
    tail = [float(v) for v in curve[-window:]]
    if len(tail) < window or not all(math.isfinite(v) for v in tail):
        return False
    return max(tail) - min(tail) <= tol


def extension(
    values: Sequence[float], chosen: float, factor: float, done: dict[str, int], limit: int
) -> tuple[str, float] | None:
    """(side, new value) when ``chosen`` sits on an extendable edge of ``values``, else None.

    ``done`` counts the extensions made so far per side ("low", "high"); ``limit`` caps them.
    """
    lo, hi = min(values), max(values)
    if len(values) > 1 and lo < chosen < hi:
        return None
    if chosen == hi and done.get("high", 0) < limit and (len(values) > 1 or chosen > 0):
        return "high", (hi * factor if hi > 0 else 1.0)
    if chosen == lo and lo > 0 and done.get("low", 0) < limit:
        return "low", lo / factor
    return None


def at_edge(values: Sequence[float], chosen: float) -> bool:
    """Whether ``chosen`` is an extendable edge (0 as the lowest value is not)."""
    if len(values) < 2:
        return False
    return chosen == max(values) or (chosen == min(values) and chosen > 0)


def selection_keys(metrics: dict[str, Any]) -> dict[str, float]:
    """The two selection criteria, both without π* (larger is better):

    - ``val``: held-out preference log-likelihood (blind to mass off 𝒜: it sees only ratios);
    - ``leak_aware``: ``val`` + E_x ln π̂(𝒜|x). The added term is exactly the leak's share of
      the forward KL (kl_fwd = kl_fwd_cond − log_mass), so a policy pays for its leaked mass in
      the same nats it would cost it against π*; for a policy on 𝒜 the rules agree.
    """
    val = metrics.get("val_pref_loglik", -math.inf)
    return {"val": val, "leak_aware": val + metrics.get("log_mass", 0.0)}


def tag(params: dict[str, float]) -> str:
    return "-".join(f"{k}{v:g}" for k, v in sorted(params.items())) or "default"


def current(plan: dict, records: list[dict]) -> dict[tuple, list[dict]]:
    """Per group, the record of every grid point at its current (highest) budget."""
    by = {(r["variant"], r["method"], r["n"], r["seed"], tag(r["params"]), r["level"]): r
          for r in records if r["method"] != "reward"}
    return {key: [by[(*key, tag(p), lv)] for p, lv in g["points"] if (*key, tag(p), lv) in by]
            for key, g in plan.items()}


def adapt_plan(cfg: SyntheticConfig, plan: dict, records: list[dict]) -> list[dict[str, Any]]:
    """Raise budgets of non-converged on-policy runs; extend grids whose choice is on an
    edge. Mutates ``plan``; returns what changed (empty: the grid is final)."""
    events = []
    now = current(plan, records)
    for key, group in plan.items():
        v, m, n, s = key
        base = {"variant": v, "method": m, "n": n, "seed": s}
        for point in group["points"]:
            rec = next((r for r in now[key] if r["params"] == point[0]), None)
            if (rec is not None and m in ONLINE and not rec.get("converged", True)
                    and point[1] < cfg.convergence.max_raises):
                point[1] += 1
                events.append({**base, "what": "budget raised", "params": point[0],
                               "detail": f"{tag(point[0])} not converged; continued to steps × "
                                         f"{cfg.convergence.raise_factor ** point[1]}"})
        if not now[key] or cfg.max_extensions == 0:
            continue
        name = SEARCHED[m]
        values = [p[name] for p, _ in group["points"]]
        for rule in ("leak_aware",):  # the claims' rule; val's edge choices are only flagged
            best = max(now[key], key=lambda r: selection_keys(r["metrics"])[rule])
            ext = extension(values, best["params"][name], cfg.extend_factor,
                                  group["ext"], cfg.max_extensions)
            if ext is None:
                continue
            side, value = ext
            new = {**best["params"], name: value}
            # a new point gets the group's largest budget, so the grid stays comparable
            group["points"].append([new, max(lv for _, lv in group["points"])])
            group["ext"][side] += 1
            values.append(value)
            events.append({**base, "what": "grid extended", "params": new, "rule": rule,
                           "detail": f"{rule} choice {name}={best['params'][name]:g} on the "
                                     f"{side} edge; added {name}={value:g}"})
    return events
