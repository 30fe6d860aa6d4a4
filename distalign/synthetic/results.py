"""Model selection, aggregation over seeds, and the outputs of ``distalign synthetic``.

Per (variant, method, n, seed) three grid points are chosen: the **val** choice (highest
held-out preference log-likelihood), the **leak-aware** choice (val + E_x ln π̂(𝒜|x), see
``adapt.selection_keys``), both computable without π*, and the **oracle** choice (lowest exact
forward KL), reported as the paper does ("the best β from a wide range"). The claims'
evidence is the leak-aware choice, and only where that run converged (``claims.py``).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from distalign.eval.report import METHOD_NAMES
from distalign.synthetic.adapt import at_edge, selection_keys
from distalign.synthetic.claims import claims, claims_markdown, slope_text
from distalign.synthetic.config import ONLINE, SEARCHED
from distalign.synthetic.plots import plot

METRICS = ("kl_fwd", "kl_fwd_cond", "kl_rev", "kl_ref", "entropy", "leak", "win_ref", "win_star",
           "obj_gap")
RULES = ("val", "leak_aware", "oracle")


def _ms(values: list[float | None]) -> dict[str, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": mean(vals), "std": stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def choose(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The val, leak-aware and oracle choices among one group's grid points."""
    out = {rule: max(runs, key=lambda r, rule=rule: selection_keys(r["metrics"])[rule])
           for rule in ("val", "leak_aware")}
    out["oracle"] = min(runs, key=lambda r: r["metrics"].get("kl_fwd", math.inf))
    return out


def select(groups: dict[tuple, list[dict]]) -> dict[tuple, dict[str, Any]]:
    """Per group key (variant, method, n, seed): the three choices and whether each sits on
    an extendable edge of the final grid."""
    out = {}
    for key, runs in groups.items():
        if not runs:
            continue
        picks = choose(runs)
        name = SEARCHED[key[1]]
        values = [r["params"][name] for r in runs]
        out[key] = {**picks, "grid": runs,
                    "at_edge": {k: at_edge(values, r["params"][name]) for k, r in picks.items()}}
    return out


def _variants(cfg: Any) -> list[str]:
    return list(cfg.reward_classes)


def summarise(cfg: Any, setup: dict, groups: dict[tuple, list[dict]], events: list[dict],
              records: list[dict], seconds: float) -> dict[str, Any]:
    chosen = select(groups)
    table: dict[str, dict[str, Any]] = {}
    for variant in _variants(cfg):
        table[variant] = {}
        for m in cfg.methods:
            gv = variant if m in ONLINE else "offline"
            per_n = {}
            for n in cfg.sizes:
                keys = sorted(k for k in chosen if k[:3] == (gv, m, n))
                if not keys:
                    continue
                cell: dict[str, Any] = {}
                for rule in RULES:
                    runs = [chosen[k][rule] for k in keys]
                    cell[rule] = {x: _ms([r["metrics"].get(x) for r in runs]) for x in METRICS}
                    cell[f"{rule}_params"] = [r["params"] for r in runs]
                    cell[f"{rule}_at_edge"] = [chosen[k]["at_edge"][rule] for k in keys]
                    # per seed: exact KL and whether it may serve as evidence (converged)
                    cell[f"{rule}_seeds"] = {
                        str(k[3]): {"kl_fwd": r["metrics"].get("kl_fwd"),
                                    "kl_fwd_cond": r["metrics"].get("kl_fwd_cond"),
                                    "converged": bool(r.get("converged", True))}
                        for k, r in zip(keys, runs, strict=True)}
                per_n[str(n)] = cell
            if per_n:
                table[variant][m] = {"by_n": per_n}
    reward: dict[str, dict[str, Any]] = {}
    for variant in _variants(cfg):
        rows = defaultdict(list)
        for r in records:
            if r["method"] == "reward" and r["variant"] == variant:
                rows[str(r["n"])].append(r["metrics"])
        reward[variant] = {
            n: {k: _ms([x.get(k) for x in v]) for k in ("rm_kl_fwd", "rm_corr", "val_pref_loglik")}
            for n, v in sorted(rows.items(), key=lambda kv: int(kv[0]))}
    online = [r for r in records if r["method"] in ONLINE]
    results = {
        "world": dict(vars(cfg.world)),
        "grid": {
            "methods": list(cfg.methods), "reward_classes": list(cfg.reward_classes),
            "sizes": list(cfg.sizes), "seeds": list(cfg.seeds), "grids": cfg.grids,
            "val_fraction": cfg.val_fraction, "workers": cfg.workers,
            "convergence": vars(cfg.convergence), "extend_factor": cfg.extend_factor,
            "max_extensions": cfg.max_extensions, "slope_points": cfg.slope_points,
            "bootstrap": cfg.bootstrap,
        },
        "reference": setup["reference"],
        "reward_model": reward,
        "methods": table,
        "events": events,
        "convergence": {"online_runs": len(online),
                        "not_converged": sum(not r.get("converged", True) for r in online)},
        "runs": [{k: r.get(k) for k in ("method", "variant", "n", "seed", "tag", "params",
                                        "level", "metrics", "converged", "obj_curve",
                                        "seconds", "run_dir")} for r in records],
        "seconds": seconds,
    }
    results["claims"] = claims(results, cfg.slope_points, cfg.bootstrap)
    return results


def _fmt(stat: dict[str, float], digits: int = 3) -> str:
    if stat["n"] == 0:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Per variant: forward KL (strict and on 𝒜) of the three choices, and the choices.

    Cells are the leak-aware choice's mean ± std over seeds, then [val choice; oracle]."""
    sizes = results["grid"]["sizes"]
    ref = results["reference"]
    head = "| method | " + " | ".join(f"n = {n}" for n in sizes) + " | slope (95% CI) |"
    sep = "|---" * (len(sizes) + 2) + "|"
    lines = []
    for variant, rows in results["methods"].items():
        for metric, title in (("kl_fwd", "E_x KL(π*‖π̂)"), ("kl_fwd_cond", "E_x KL(π*‖π̂(·|𝒜))")):
            lines += [f"**{variant} reward class: {title}** (↓; leak-aware choice mean ± std "
                      "over seeds [val choice; oracle])", "", head, sep]
            for m, row in rows.items():
                cells = []
                for n in sizes:
                    c = row["by_n"].get(str(n))
                    cells.append("–" if c is None else
                                 f"{_fmt(c['leak_aware'][metric])} [{c['val'][metric]['mean']:.3f}"
                                 f"; {c['oracle'][metric]['mean']:.3f}]")
                slope = slope_text(results, variant, m, metric)
                lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(cells) + f" | {slope} |")
            lines.append("")
        lines += [f"**{variant}: chosen grid points per seed** (val / leak-aware / oracle; "
                  "* = on a grid edge)", "", "| method | n | val | leak-aware | oracle |",
                  "|---|---|---|---|---|"]
        for m, row in rows.items():
            name = SEARCHED[m]
            for n, c in row["by_n"].items():
                parts = [", ".join(f"{p[name]:g}{'*' if e else ''}" for p, e in
                                   zip(c[f"{r}_params"], c[f"{r}_at_edge"], strict=True))
                         for r in RULES]
                lines.append(f"| {METHOD_NAMES.get(m, m)} ({name}) | {n} | "
                             + " | ".join(parts) + " |")
        lines.append("")
    floor = ref["rlhf_floor_true_reward"]["kl_fwd"]
    lines += [f"Reference points: π₀ {ref['pi0']['kl_fwd']:.3f} (on 𝒜: "
              f"{ref['pi0']['kl_fwd_cond']:.3f}, leak {ref['pi0']['leak']:.3f}); π_sft "
              f"{ref['pi_sft']['kl_fwd']:.3f}; best RLHF-family policy π₀·π*^(γ/β) with the "
              f"true reward: {floor:.3f}."]
    for variant, rm in results["reward_model"].items():
        if rm:
            txt = "; ".join(f"n={n}: {_fmt(v['rm_kl_fwd'])}" for n, v in rm.items())
            lines.append(f"{variant} reward model, through π̃ ∝ exp(R̂/γ): KL(π*‖π̃) {txt}.")
    conv = results["convergence"]
    lines.append(f"On-policy runs: {conv['online_runs']}, not converged: {conv['not_converged']}"
                 f"; grid events (budget raises, extensions): {len(results['events'])}.")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out: Path) -> None:
    (out / "synthetic_results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "synthetic_table.md").write_text(markdown_table(results))
    (out / "claims.md").write_text(claims_markdown(results))
    plot(results, out)
