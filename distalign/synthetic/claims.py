"""``claims.md``: one row per claim of the paper, with numbers, a 95 % bootstrap CI over seeds
and a verdict by the rules written into the file (``RULES_TEXT``).

Evidence is the leak-aware choice of each (variant, method, n, seed) — selected without π* —
and only runs that converged (``adapt.converged``); a cell whose chosen run did not converge is
left out, and a claim with too little evidence left is inconclusive.
"""

from __future__ import annotations

import math
import random
from statistics import mean
from typing import Any

from distalign.stats import loglog_slope

# A slope CI entirely below this agrees with the O(1/n) rate; entirely above it, disagrees.
# −0.65 is midway between the theorems' −1 and the −0.3 that version 1 of this world measured,
# so the rule tells exactly those two apart.
SLOPE_THRESHOLD = -0.65
RULE = "leak_aware"
RULES_TEXT = f"""Rules (fixed before the run; evidence = the leak-aware choice of each cell,
selected without π*, converged runs only; CI = 95 % percentile bootstrap over seeds):

- **Consistency at O(1/n)** (Theorems 4, 6, 7): slope of ln KL(π*‖π̂) on ln n over the largest
  sizes. *agree* if the CI lies below {SLOPE_THRESHOLD}, *disagree* if it lies above, else
  *inconclusive*.
- **RLHF floor** (the paper's §3 dilemma): KL at the largest n against the best forward KL
  of the RLHF family with the true reward. *agree* if the CI lies above the floor, *disagree*
  if below, else *inconclusive*.
- **DPO degenerates**: *agree* if DPO's slope CI lies above {SLOPE_THRESHOLD} (no O(1/n)
  convergence), *disagree* if below, else *inconclusive*.
- **On-policy beats likelihood** (Theorem 7 against Theorems 4 and 6, premise Assumption 5):
  paired difference KL(likelihood method) − KL(on-policy method) at the largest n, per seed.
  Light reward class (premise holds): *agree* if the CI lies above 0, *disagree* if below.
  Standard class (premise fails; no advantage predicted): *agree* if the CI lies below 0,
  *disagree* if above. Else *inconclusive*.
- Too few converged seeds (< 2) for a CI: *inconclusive*.
"""


def _seed_values(results: dict, variant: str, method: str, metric: str, rule: str = RULE):
    """{n: {seed: value}} of converged chosen runs."""
    row = results["methods"].get(variant, {}).get(method)
    if row is None:
        return {}
    return {int(n): {s: v[metric] for s, v in c[f"{rule}_seeds"].items()
                     if v["converged"] and v.get(metric) is not None}
            for n, c in row["by_n"].items()}


def _percentiles(draws: list[float]) -> list[float]:
    draws = sorted(d for d in draws if math.isfinite(d))
    if len(draws) < 10:
        return [math.nan, math.nan]
    return [draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))]]


def bootstrap_slope(per_n: dict[int, dict[str, float]], points: int, resamples: int,
                    seed: int = 0) -> dict[str, Any]:
    """Slope of ln(mean over seeds) on ln n over the ``points`` largest sizes, and its 95 %
    CI from resampling the seeds with replacement (all sizes share a resample)."""
    sizes = sorted(per_n)[-points:]
    seeds = sorted({s for n in sizes for s in per_n[n]})
    out: dict[str, Any] = {"sizes": sizes, "seeds": len(seeds), "slope": math.nan,
                           "ci": [math.nan, math.nan]}
    if len(sizes) < 2 or any(not per_n[n] for n in sizes):
        return out
    out["slope"] = loglog_slope(sizes, [mean(per_n[n].values()) for n in sizes])
    if any(len(per_n[n]) < 2 for n in sizes):  # a point estimate, but no CI
        return out
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        pick = [rng.choice(seeds) for _ in seeds]
        ys = [[per_n[n][s] for s in pick if s in per_n[n]] for n in sizes]
        if all(ys):
            draws.append(loglog_slope(sizes, [mean(y) for y in ys]))
    out["ci"] = _percentiles(draws)
    return out


def bootstrap_mean(values: list[float], resamples: int, seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": mean(values) if values else math.nan, "seeds": len(values),
                           "ci": [math.nan, math.nan]}
    if len(values) >= 2:
        rng = random.Random(seed)
        out["ci"] = _percentiles([mean(rng.choice(values) for _ in values)
                                  for _ in range(resamples)])
    return out


def _verdict(ci: list[float], threshold: float, agree_below: bool) -> str:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if hi < threshold:
        return "agree" if agree_below else "disagree"
    if lo > threshold:
        return "disagree" if agree_below else "agree"
    return "inconclusive"


def claims(results: dict[str, Any], points: int, resamples: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    variants = list(results["methods"])
    floor = results["reference"]["rlhf_floor_true_reward"]["kl_fwd"]

    def slope_row(claim: str, variant: str, method: str, agree_below: bool) -> None:
        if method not in results["methods"].get(variant, {}):
            return
        s = bootstrap_slope(_seed_values(results, variant, method, "kl_fwd"), points, resamples)
        label = "either (no R̂)" if method in ("pmle", "dpo") else variant
        rows.append({"claim": claim, "variant": label, "method": method, "stat": "slope",
                     "value": s["slope"], "ci": s["ci"], "detail": f"n ∈ {s['sizes']}",
                     "verdict": _verdict(s["ci"], SLOPE_THRESHOLD, agree_below)})

    first = variants[0] if variants else None
    for m in ("pmle", "distill", "rkl"):
        for v in ([first] if m == "pmle" else variants):
            slope_row("consistent at O(1/n)", v, m, agree_below=True)
    for v in variants:
        per_n = _seed_values(results, v, "rlhf", "kl_fwd")
        if per_n:
            top = max(per_n)
            b = bootstrap_mean(list(per_n[top].values()), resamples)
            rows.append({"claim": "RLHF stays above its floor", "variant": v, "method": "rlhf",
                         "stat": f"KL at n={top}", "value": b["mean"], "ci": b["ci"],
                         "detail": f"floor {floor:.3f}",
                         "verdict": _verdict(b["ci"], floor, agree_below=False)})
    if first:
        slope_row("DPO degenerates (no O(1/n))", first, "dpo", agree_below=False)
    for v in variants:
        for online, offline in (("rkl", "pmle"), ("distill", "pmle"), ("rlhf", "dpo")):
            a = _seed_values(results, v, offline, "kl_fwd")
            b = _seed_values(results, v, online, "kl_fwd")
            if not a or not b:
                continue
            top = max(set(a) & set(b))
            diffs = [a[top][s] - b[top][s] for s in a[top] if s in b[top]]
            st = bootstrap_mean(diffs, resamples)
            light = v == "light"
            rows.append({
                "claim": f"{online} beats {offline}" if light else
                f"{online} does not beat {offline}",
                "variant": v, "method": f"{online} vs {offline}",
                "stat": f"KL({offline}) − KL({online}) at n={top}", "value": st["mean"],
                "ci": st["ci"], "detail": f"{st['seeds']} paired seeds",
                "verdict": _verdict(st["ci"], 0.0, agree_below=not light)})
    return rows


def slope_text(results: dict[str, Any], variant: str, method: str, metric: str) -> str:
    s = bootstrap_slope(_seed_values(results, variant, method, metric),
                        results["grid"]["slope_points"], results["grid"]["bootstrap"])
    if not math.isfinite(s["slope"]):
        return "–"
    lo, hi = s["ci"]
    ci = f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else ""
    return f"{s['slope']:.2f}{ci}"


def claims_markdown(results: dict[str, Any]) -> str:
    grid = results["grid"]
    lines = [
        "# The paper's claims in the synthetic world (generated by `distalign synthetic`)", "",
        f"Sizes n ∈ {grid['sizes']}, seeds {grid['seeds']}, reward classes "
        f"{grid['reward_classes']}; {results['convergence']['not_converged']} of "
        f"{results['convergence']['online_runs']} on-policy runs did not converge; "
        f"{len(results['events'])} grid events (see synthetic_table.md). "
        f"Wall time: {results['seconds']:.0f} s.", "",
        "| claim | reward class | method | statistic | value | 95 % CI | | verdict |",
        "|---|---|---|---|---|---|---|---|"]
    for r in results["claims"]:
        lo, hi = r["ci"]
        ci = f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else "–"
        value = f"{r['value']:.3f}" if math.isfinite(r["value"]) else "–"
        detail = r["detail"] + ("" if math.isfinite(lo) else "; < 2 usable (converged) seeds")
        lines.append(f"| {r['claim']} | {r['variant']} | {r['method']} | {r['stat']} | "
                     f"{value} | {ci} | {detail} | **{r['verdict']}** |")
    return "\n".join([*lines, "", RULES_TEXT])
