"""Write a toy run to disk: results.json, results.csv and the Figure 1 plot."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from distalign.jsonsafe import json_safe
from distalign.tabular.config import ToyResults

LABELS = {
    "rlhf": "RLHF (1)",
    "rkl": "reverse KL (15)",
    "pmle": "PMLE (5)",
    "distill": "pref. distillation (12)",
    "dpo": "DPO (6)",
    "rebel": "REBEL (10)",
}
STYLE = {  # distribution-learning methods solid, their RLHF-side analogues dashed
    "rlhf": ("tab:red", "--"),
    "rkl": ("tab:blue", "-"),
    "pmle": ("tab:green", "-"),
    "distill": ("tab:purple", "-"),
    "dpo": ("tab:olive", "--"),
    "rebel": ("tab:orange", ":"),
}


def write_json(results: ToyResults, path: Path) -> None:
    path.write_text(json.dumps(json_safe(results.to_dict()), indent=1))


def write_csv(results: ToyResults, path: Path) -> None:
    """One row per (method, n, seed), the same fields as the JSON records."""
    fields = list(results.records[0])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results.records)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power_label(base: int) -> Callable[[float, object], str]:
    """Tick labels like 2¹⁰ in plain unicode: mathtext parsing would dominate the plot time."""

    def label(value: float, _pos: object) -> str:
        if value <= 0:
            return ""
        k = round(math.log(value, base))
        return f"{base}{str(k).translate(_SUPERSCRIPT)}" if math.isclose(value, base**k) else ""

    return label


def plot_figure1(results: ToyResults, path: Path, title: str | None = None) -> None:
    """Log-log forward KL vs n per method, 95% bands; left oracle β, right honest β.

    Built on a bare ``Figure`` (no pyplot, no tight_layout): importing pyplot and the extra
    layout render cost more than the whole solve of the toy.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    cfg = results.config
    fig = Figure(figsize=(11, 4.3))
    axes = fig.subplots(1, 2, sharey=True)
    kl0 = sum(results.kl_star_ref) / len(results.kl_star_ref)
    # y-range from the curves near the interesting range: the honest choice at tiny n can pick
    # a near-greedy policy with a huge KL, which would squash every other curve
    means = [r["fkl"] for r in results.summary if 0 < r["fkl"] <= 10 * kl0]
    ylim = (0.3 * min(means, default=kl0 / 10), 4 * kl0)
    for ax, choice in zip(axes, ("oracle", "honest"), strict=True):
        for m in cfg.methods:
            rows = sorted(
                (r for r in results.summary if r["method"] == m and r["choice"] == choice),
                key=lambda r: r["n"],
            )
            ns = [r["n"] for r in rows]
            mean = [r["fkl"] for r in rows]
            lo = [max(r["fkl_lo"], ylim[0] / 10) for r in rows]
            hi = [r["fkl_hi"] for r in rows]
            color, ls = STYLE.get(m, ("black", "-"))
            slope = results.slopes[m][choice]  # NaN with one size n in the top decade
            ax.plot(ns, mean, ls, color=color, marker="o", ms=3, label=LABELS.get(m, m)
                    + (f"  slope {slope:+.2f}" if math.isfinite(slope) else ""))
            if cfg.seeds > 1:  # one seed has no interval: no band
                ax.fill_between(ns, lo, hi, color=color, alpha=0.15, lw=0)
        ax.axhline(kl0, color="gray", lw=1, ls="-.", label="KL(π*‖π₀)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_power_label(2)))
        ax.yaxis.set_major_formatter(FuncFormatter(_power_label(10)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(*ylim)
        ax.set_xlabel("n (labelled pairs)")
        ax.set_title(f"{choice} β" + (" (best true forward KL)" if choice == "oracle"
                                      else " (best held-out pref. log-lik.)"))
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("E_x KL(π* ‖ π̂)")
    for ax in axes:
        ax.legend(fontsize=6.5, loc="lower left")
    spread = "(mean, 95% t-interval)" if cfg.seeds > 1 else "(one seed: no interval)"
    fig.suptitle(title or (f"toy '{cfg.preset}': |X|={cfg.contexts}, K={cfg.responses}, "
                           f"γ={cfg.gamma}, logit scale {cfg.logit_scale}, {cfg.seeds} "
                           f"seed{'s' * (cfg.seeds > 1)} {spread}"), fontsize=9)
    fig.subplots_adjust(left=0.065, right=0.99, bottom=0.11, top=0.87, wspace=0.04)
    fig.savefig(path, dpi=120)


def write_outputs(
    results: ToyResults, out: Path, figure: Path | None = None
) -> dict[str, Path]:
    """Write all outputs into ``out`` (created) and return their paths; ``figure`` defaults to
    ``out/figure1.png``. The seconds spent are added to ``results.timings["io_plot"]``."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "figure": figure or out / "figure1.png",
    }
    write_csv(results, paths["csv"])
    plot_figure1(results, paths["figure"])
    results.timings["io_plot"] = time.perf_counter() - t0
    write_json(results, paths["json"])  # last, so that it records the I/O time too
    return paths


def load_results(path: Path) -> ToyResults:
    """Read a results.json written by :func:`write_json` back (e.g. to re-plot it)."""
    from distalign.tabular.config import ToyConfig

    data = json.loads(Path(path).read_text())
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()}
    return ToyResults(ToyConfig(**cfg), data["records"], data["kl_star_ref"]["per_seed"],
                      data["seconds"], data["summary"], data["slopes"],
                      solver=data.get("solver", ""))
