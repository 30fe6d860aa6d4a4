"""``claims.md`` of a tilted-world pipeline: the paper's claims checked on a real π₀.

Evidence is each row's ``tilted/*`` measures (``eval/eval.json``: means over the evaluated
prompts with their standard errors). A method's value is the mean over its seeds; its standard
error combines the prompt-level SEs with the spread between seeds (conservative: the seeds'
evaluation noise is counted twice). A claim compares two methods: the difference d = A − B
and its 95 % interval d ± 1.96·√(se_A² + se_B²) (independent errors: also conservative, as
both are measured on the same prompts). The rules are fixed in ``RULES_TEXT``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Z95 = 1.959964
RULES_TEXT = """Rules (fixed before the run). A claim "A < B on metric m" is checked on the
difference d = m(A) − m(B): *agree* if its 95 % interval lies on the predicted side of 0,
*disagree* if it lies on the other side, else *inconclusive*. A method's m is the mean over
its seeds of the mean over the evaluated prompts; its standard error combines the prompt-level
SE with the between-seed spread; the two methods' errors are added as if independent (both
choices widen the interval). Methods are compared at the settings of the pipeline config (no
tuning on the evaluated prompts)."""

# (claim, metric, method A, relation, method B, why). Names are the report's row labels.
CLAIMS: list[tuple[str, str, str, str, str, str]] = [
    ("RLHF floor", "tilted/kl_fwd", "RLHF", ">", "PMLE",
     "R̂ ≈ γ ln π* makes RLHF's optimum π₀·π*^{γ/β}, not π* (§3)"),
    ("RLHF floor", "tilted/kl_fwd", "RLHF", ">", "Pref. Distill.", "as above"),
    ("RLHF floor", "tilted/kl_fwd", "RLHF", ">", "Reverse KL", "as above"),
    ("Consistent objectives beat DPO", "tilted/kl_fwd", "PMLE", "<", "DPO",
     "PMLE's optimum is π*; DPO's is π₀·π*^{γ/β} (Theorems 4 vs §3)"),
    ("Consistent objectives beat DPO", "tilted/kl_fwd", "Pref. Distill.", "<", "DPO",
     "Theorem 6"),
    ("Consistent objectives beat DPO", "tilted/kl_fwd", "Reverse KL", "<", "DPO", "Theorem 7"),
    ("RKL keeps entropy", "tilted/entropy", "Reverse KL", ">", "RLHF",
     "the entropy term γH(π) of (15) against RLHF's mode seeking"),
    ("Table 2: PMLE vs DPO", "tilted/oracle_win", "PMLE", ">", "DPO", "Table 2 win-rate"),
    ("Table 2: PMLE vs DPO", "tilted/kl_ref", "PMLE", "<", "DPO", "Table 2 KL(π‖π₀)"),
    ("Table 2: distillation vs REBEL", "tilted/oracle_win", "Pref. Distill.", ">", "REBEL",
     "Table 2 win-rate"),
    ("Table 2: RKL vs RLHF", "tilted/oracle_win", "Reverse KL", ">", "RLHF",
     "Table 2 win-rate"),
]


def method_value(runs: list[dict[str, float]], metric: str) -> dict[str, float] | None:
    """Mean over seeds and its standard error (prompt SEs and the between-seed spread)."""
    vals = [r[metric] for r in runs if metric in r and math.isfinite(r[metric])]
    if not vals:
        return None
    ses = [r.get(f"{metric}_se", math.nan) for r in runs if metric in r]
    k = len(vals)
    mean = sum(vals) / k
    within = sum(s * s for s in ses if math.isfinite(s)) / (k * k)
    between = (sum((v - mean) ** 2 for v in vals) / (k - 1) / k) if k > 1 else 0.0
    return {"mean": mean, "se": math.sqrt(within + between), "seeds": k}


def verdict(d: float, se: float, relation: str) -> str:
    lo, hi = d - Z95 * se, d + Z95 * se
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if relation == "<":
        lo, hi = -hi, -lo  # "A < B" is "B − A > 0"
    return "agree" if lo > 0 else ("disagree" if hi < 0 else "inconclusive")


def check_claims(by_method: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    out = []
    for claim, metric, a, rel, b, why in CLAIMS:
        va, vb = (method_value(by_method.get(m, []), metric) for m in (a, b))
        row: dict[str, Any] = {"claim": claim, "metric": metric, "a": a, "relation": rel,
                               "b": b, "why": why}
        if va is None or vb is None:
            row.update(verdict="inconclusive", note="a method was not run or not measured")
        else:
            d, se = va["mean"] - vb["mean"], math.sqrt(va["se"] ** 2 + vb["se"] ** 2)
            row.update(value_a=va, value_b=vb, difference=d,
                       ci=[d - Z95 * se, d + Z95 * se], verdict=verdict(d, se, rel))
        out.append(row)
    return out


def frontier(logp0: list[Any], r: list[Any], betas: Any) -> list[tuple[float, float]]:
    """(KL(π_β‖π₀), E_π_β[r]) of the KL-regularised optima π_β ∝ π₀·exp(r/β), by
    self-normalised importance sampling from π₀'s replies per prompt: the best gold reward
    reachable at each KL from π₀ (no policy does better on both axes)."""
    import numpy as np

    pts = []
    for beta in betas:
        kls, rs = [], []
        for rr in r:
            s = np.asarray(rr, np.float64) / beta
            w = np.exp(s - s.max())
            wt = w / w.sum()
            kls.append(float(np.sum(wt * s) - (s.max() + math.log(w.mean()))))
            rs.append(float(np.sum(wt * np.asarray(rr))))
        pts.append((float(np.mean(kls)), float(np.mean(rs))))
    return pts


def claims_markdown(rows: list[dict[str, Any]], title: str, extra: list[str]) -> str:
    lines = [f"# {title}: claims", "", RULES_TEXT, "",
             "| claim | metric | A | B | A − B (95 % interval) | verdict | why |",
             "|---|---|---|---|---|---|---|"]
    for c in rows:
        if "difference" in c:
            a, b = c["value_a"], c["value_b"]
            diff = (f"{a['mean']:.3f} − {b['mean']:.3f} = {c['difference']:+.3f} "
                    f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]")
        else:
            diff = c.get("note", "–")
        lines.append(f"| {c['claim']} | {c['metric']} | {c['a']} {c['relation']} | {c['b']} | "
                     f"{diff} | **{c['verdict']}** | {c['why']} |")
    return "\n".join([*lines, "", *extra]) + "\n"


def read_rows(root: Path, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """{row label: [metrics of each seed's eval.json]} (labels as the report names them)."""
    from distalign.eval.report import METHOD_NAMES

    out: dict[str, list[dict[str, float]]] = {}
    for r in rows:
        path = root / r["name"] / "eval" / "eval.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text()).get("metrics", {})
        label = METHOD_NAMES.get(r["method"], r["method"])
        out.setdefault(label, []).append({k: float(v) for k, v in metrics.items()
                                          if isinstance(v, (int, float))
                                          and not isinstance(v, bool)})
    return out
