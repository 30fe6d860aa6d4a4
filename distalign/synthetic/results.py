"""Model selection, aggregation over seeds, and the outputs of ``distalign synthetic``.

Selection: for every (method, n, seed) the grid point with the highest held-out preference
log-likelihood ``val_pref_loglik`` is *selected* (computable without π*); the grid point with
the lowest exact forward KL is the *oracle* choice, reported as the paper does ("the best β
from a wide range", SPEC §5.1).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Any

METRICS = ("kl_fwd", "kl_fwd_cond", "kl_rev", "kl_ref", "entropy", "leak", "win_ref", "win_star")
NAMES = {
    "pmle": "PMLE",
    "dpo": "DPO",
    "distill": "Pref. distill.",
    "rebel": "REBEL",
    "rlhf": "RLHF",
    "rkl": "Reverse KL",
}


def _ms(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": mean(vals), "std": stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def select(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per (method, n, seed): the val-selected and the oracle grid point."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["method"] != "reward":
            groups[(r["method"], r["n"], r["seed"])].append(r)
    out = {}
    for key, runs in groups.items():
        val = max(runs, key=lambda r: r["metrics"].get("val_pref_loglik", -math.inf))
        orc = min(runs, key=lambda r: r["metrics"].get("kl_fwd", math.inf))
        out[key] = {"selected": val, "oracle": orc, "grid": runs}
    return out


def _slope(ns: list[int], values: list[float]) -> float:
    """Least-squares slope of ln KL against ln n (−1 is the paper's O(1/n) rate)."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values, strict=True) if v > 0]
    if len(pts) < 2:
        return float("nan")
    mx, my = mean(p[0] for p in pts), mean(p[1] for p in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else float("nan")


def summarise(cfg: Any, setup: dict, records: list[dict], seconds: float) -> dict[str, Any]:
    chosen = select(records)
    methods = [m for m in cfg.methods if any(k[0] == m for k in chosen)]
    table: dict[str, dict[str, Any]] = {}
    for m in methods:
        per_n = {}
        for n in cfg.sizes:
            keys = [k for k in chosen if k[0] == m and k[1] == n]
            if not keys:
                continue
            sel = [chosen[k]["selected"] for k in keys]
            orc = [chosen[k]["oracle"] for k in keys]
            per_n[str(n)] = {
                "selected": {x: _ms([r["metrics"].get(x) for r in sel]) for x in METRICS},
                "oracle": {x: _ms([r["metrics"].get(x) for r in orc]) for x in METRICS},
                "selected_params": [r["params"] for r in sel],
                "oracle_params": [r["params"] for r in orc],
            }
        ns = [int(n) for n in per_n]
        table[m] = {
            "by_n": per_n,
            "slope_selected": _slope(ns, [per_n[str(n)]["selected"]["kl_fwd"]["mean"] for n in ns]),
            "slope_oracle": _slope(ns, [per_n[str(n)]["oracle"]["kl_fwd"]["mean"] for n in ns]),
        }
    rms = defaultdict(list)
    for r in records:
        if r["method"] == "reward":
            rms[str(r["n"])].append(r["metrics"])
    reward = {
        n: {k: _ms([x.get(k) for x in rows]) for k in ("rm_kl_fwd", "rm_corr", "val_pref_loglik")}
        for n, rows in sorted(rms.items(), key=lambda kv: int(kv[0]))
    }
    return {
        "world": {k: v for k, v in vars(cfg.world).items()},
        "grid": {
            "methods": list(cfg.methods), "sizes": list(cfg.sizes), "seeds": list(cfg.seeds),
            "grids": cfg.grids, "val_fraction": cfg.val_fraction, "workers": cfg.workers,
        },
        "reference": setup["reference"],
        "reward_model": reward,
        "methods": table,
        "runs": [{k: r[k] for k in ("method", "n", "seed", "tag", "params", "metrics",
                                    "seconds", "run_dir")} for r in records],
        "seconds": seconds,
    }


def _fmt(stat: dict[str, float], digits: int = 3) -> str:
    if stat["n"] == 0:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _kl_rows(results: dict[str, Any], metric: str, sizes: list[int]) -> list[str]:
    lines = []
    for m, row in results["methods"].items():
        cells = []
        for n in sizes:
            c = row["by_n"].get(str(n))
            cells.append("–" if c is None else
                         f"{_fmt(c['selected'][metric])} ({c['oracle'][metric]['mean']:.3f})")
        slope = row["slope_selected"] if metric == "kl_fwd" else _slope(
            [int(n) for n in row["by_n"]],
            [row["by_n"][n]["selected"][metric]["mean"] for n in row["by_n"]])
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + f" | {slope:.2f} |")
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    """Forward KL (strict and on 𝒜), win-rate vs π₀ and leak; one row per method.

    Cells are val-selected mean ± std over seeds, the oracle grid point's mean in brackets;
    "slope" is the least-squares slope of ln KL against ln n (−1 = the O(1/n) rate).
    """
    sizes = results["grid"]["sizes"]
    ref = results["reference"]
    head = "| method | " + " | ".join(f"n = {n}" for n in sizes) + " | slope |"
    sep = "|---" * (len(sizes) + 2) + "|"
    lines = ["**Forward KL E_x KL(π*‖π̂)** (↓; val-selected mean ± std over seeds, oracle "
             "choice in brackets)", "", head, sep, *_kl_rows(results, "kl_fwd", sizes)]
    lines += ["", "**Forward KL on 𝒜, E_x KL(π*‖π̂(·|𝒜))** (↓; the leaked mass not charged)",
              "", head, sep, *_kl_rows(results, "kl_fwd_cond", sizes)]
    floor = ref["rlhf_floor_true_reward"]["kl_fwd"]
    lines += ["", f"Reference points: π₀ {ref['pi0']['kl_fwd']:.3f} (on 𝒜: "
              f"{ref['pi0']['kl_fwd_cond']:.3f}, leak {ref['pi0']['leak']:.3f}); π_sft "
              f"{ref['pi_sft']['kl_fwd']:.3f}; best RLHF-family policy π₀·π*^(γ/β) with the "
              f"true reward: {floor:.3f}."]
    if results["reward_model"]:
        rm = "; ".join(f"n={n}: {_fmt(v['rm_kl_fwd'])}" for n, v in results["reward_model"].items())
        lines.append(f"Reward model, through its induced π̃ ∝ exp(R̂/γ) on 𝒜: KL(π*‖π̃) {rm}.")
    lines += ["", "**Oracle win-rate of π̂ against π₀** (↑; val-selected) and leaked mass "
              "1 − π̂(𝒜)", "", "| method | " + " | ".join(f"n = {n}" for n in sizes) + " |",
              "|---" * (len(sizes) + 1) + "|"]
    for m, row in results["methods"].items():
        cells = []
        for n in sizes:
            c = row["by_n"].get(str(n))
            cells.append("–" if c is None else f"{_fmt(c['selected']['win_ref'])} "
                         f"(leak {c['selected']['leak']['mean']:.3f})")
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curves(ax, results: dict[str, Any], metric: str) -> None:
    for i, (m, row) in enumerate(results["methods"].items()):
        ns = [int(n) for n in row["by_n"]]
        for kind, style in (("selected", "-o"), ("oracle", ":")):
            mu = [row["by_n"][str(n)][kind][metric]["mean"] for n in ns]
            sd = [row["by_n"][str(n)][kind][metric]["std"] for n in ns]
            label = NAMES.get(m, m) if kind == "selected" else None
            ax.errorbar(ns, mu, yerr=sd, fmt=style, color=f"C{i}", capsize=3, label=label,
                        alpha=1.0 if kind == "selected" else 0.6, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("preference pairs n")


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """synthetic_kl.png (log-log forward KL vs n: strict, and on 𝒜) and synthetic_winrate.png.

    Solid: val-selected grid point, mean ± std over seeds; dotted: oracle grid point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = results["reference"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    rm = results["reward_model"]
    for ax, metric, title in ((axes[0], "kl_fwd", "E_x KL(π*‖π̂)  (mass off A charged)"),
                              (axes[1], "kl_fwd_cond", "E_x KL(π*‖π̂(·|A))  (on A)")):
        _curves(ax, results, metric)
        if rm:  # what distill / RKL converge to at β = 0: the reward model's own LM
            ns = [int(n) for n in rm]
            ax.plot(ns, [rm[str(n)]["rm_kl_fwd"]["mean"] for n in ns], "k--", lw=0.8,
                    label="reward model's π̃ ∝ exp(R̂/γ)")
        ax.axhline(ref["pi0"][metric], color="gray", ls="--", lw=1, label="π₀")
        ax.axhline(ref["rlhf_floor_true_reward"]["kl_fwd"], color="black", ls="-.", lw=1,
                   label="RLHF family, true reward")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("forward KL (nats)")
    axes[1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle("synthetic world: solid = val-selected, dotted = oracle grid point", fontsize=9)
    fig.tight_layout()
    paths = [out / "synthetic_kl.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _curves(ax, results, "win_ref")
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set_ylabel("oracle win-rate vs π₀")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / "synthetic_winrate.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def rewrite_outputs(out: str | Path) -> None:
    """Regenerate the table and plots from an existing ``synthetic_results.json``."""
    out = Path(out)
    write_outputs(json.loads((out / "synthetic_results.json").read_text()), out)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    (out / "synthetic_results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "synthetic_table.md").write_text(markdown_table(results))
    plot(results, out)
