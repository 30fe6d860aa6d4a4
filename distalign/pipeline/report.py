"""The pipeline's closing report: Table 2's shape (mean ± std over seeds), π₀ first.

Each row's numbers come from the run's ``eval/eval.json`` (the first judge, RM score and
KL(π‖π₀)) and ``eval-<judge>/eval.json`` (the other judges' win-rates, as
``eval/win_rate@<judge>``); a pipeline without an eval stage reports its runs' training
summaries instead. Aggregation and the table are :mod:`distalign.eval.report`'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distalign.errors import ConfigError
from distalign.eval.report import Run, aggregate, default_metrics, load_run, markdown, metric_label
from distalign.eval.report import plot as bar_plot
from distalign.hostspeed import describe

SECONDARY = ("eval/win_rate", "eval/win_rate_se", "eval/win_rate_discrete")
EVAL_COLUMNS = ("eval/win_rate", "eval/rm_score", "eval/kl_ref", "eval/entropy", "eval/length")

# the training-time curves of online runs shown beside the table (one plot per run)
CURVES = ("env/score", "env/kl", "env/entropy")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _row_metrics(run_dir: Path, judges: list[str]) -> dict[str, float]:
    metrics = dict(_json(run_dir / "eval" / "eval.json").get("metrics", {}))
    for label in judges[1:]:
        other = _json(run_dir / f"eval-{label}" / "eval.json").get("metrics", {})
        metrics.update({f"{k}@{label}": other[k] for k in SECONDARY if k in other})
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _label(metric: str, judges: list[str]) -> str:
    if metric == "eval/win_rate" and len(judges) > 1:  # the first judge's column is unsuffixed
        metric = f"{metric}@{judges[0]}"
    return metric_label(metric)


def _columns(runs: list[Run], judges: list[str]) -> list[str]:
    present = set().union(*(r.metrics for r in runs))
    wanted = ["eval/win_rate", *(f"eval/win_rate@{j}" for j in judges[1:]), *EVAL_COLUMNS[1:]]
    cols = [m for m in wanted if m in present]
    if cols:
        return cols
    try:
        return default_metrics(runs)
    except ConfigError:
        return [m for m in ("loss",) if m in present] or sorted(present)[:3]


def _online_table(root: Path, rows: list[dict[str, Any]]) -> str:
    """R̂, KL(π‖π₀) and entropy of the rollouts at the end of each online run."""
    runs = []
    for r in rows:
        mark = _json(root / r["name"] / ".done.curves.json").get("result", {})
        last = {k: v for k, v in mark.get("last", {}).items() if v is not None}
        if last:
            runs.append(Run(path=root / r["name"], method=r["method"], name=r["name"],
                            seed=r["seed"], metrics=last))
    if not runs:
        return ""
    cols = [k for k in CURVES if any(k in run.metrics for run in runs)]
    lines = markdown(aggregate(runs, cols), cols).splitlines()
    lines[0] = "| Algorithm | " + " | ".join(f"{c} (train)" for c in cols) + " | runs |"
    return "\n".join(lines)


def reward_accuracy(reward: str | None) -> tuple[float, int | None, Path] | None:
    """(held-out pair accuracy, pairs it was measured on, run dir) of a trained reward model
    (its ``summary.json``), or None (no RM, a given one, or no held-out pairs)."""
    if not reward:
        return None
    run_dir = Path(reward).parent
    summary = _json(run_dir / "summary.json")
    acc = summary.get("metrics", {}).get("eval/rm/accuracy")
    if acc is None:
        return None
    n = (summary.get("data", {}).get("eval") or {}).get("rows_kept")
    return float(acc), (int(n) if n else None), run_dir


def accuracy_line(reward: str | None) -> str | None:
    """``Reward model: held-out pair accuracy 0.545 on 200 pairs (95% interval 0.476–0.612:
    at chance)``: an RM whose interval holds 0.5 ranks pairs no better than a coin, and every
    RM-judged number of the report measures that RM, not preference."""
    found = reward_accuracy(reward)
    if found is None:
        return None
    acc, n, run_dir = found
    text = f"Reward model: held-out pair accuracy {acc:.3f}"
    if n:
        lo, hi = wilson(acc, n)
        verdict = "at chance" if lo <= 0.5 <= hi else ("below chance" if hi < 0.5 else
                                                       "above chance")
        text += f" on {n} pairs (95% interval {lo:.3f}–{hi:.3f}: {verdict})"
    return text + f" (eval/rm/accuracy of {run_dir})."


def wilson(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's 95% interval of a proportion ``p`` observed on ``n`` trials (it stays inside
    [0, 1] and is not degenerate at p = 0 or 1, unlike p ± z·SE)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(centre - half, 0.0), min(centre + half, 1.0)


def write_report(out: str, rows: list[dict[str, Any]], judges: list[str],
                 metrics: list[str] | None, reward: str | None,
                 stages: list[list[str]], title: str) -> dict[str, Any]:
    """Write ``report.md``, ``report.png`` and ``report.json`` under ``out``."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)  # a pipeline of π₀ alone may have written nothing
    runs = []
    for r in rows:
        run_dir = root / r["name"]
        m = _row_metrics(run_dir, judges)
        if not m and r["method"] != "base":  # no eval stage: the training summary
            m = load_run(run_dir).metrics
        runs.append(Run(path=run_dir, method=r["method"], name=r["name"], seed=r["seed"],
                        metrics=m))
    cols = metrics or (_columns(runs, judges) if runs else [])
    table_rows = aggregate(runs, cols) if runs else []
    # π₀ first: every method is read against doing nothing
    table_rows.sort(key=lambda row: row.label != "base")
    for row in table_rows:
        if row.label == "base":
            row.label = "π₀ (base)"
    titles = [_label(c, judges) for c in cols]
    if cols:
        lines = markdown(table_rows, cols).splitlines()
        lines[0] = "| Algorithm | " + " | ".join(titles) + " | runs |"
        table = "\n".join(lines) + "\n"
        bar_plot(table_rows, cols, root / "report.png", titles)
    else:  # e.g. π₀ alone without an eval stage: no numbers, and no empty figure
        table = ("Nothing to tabulate: no run has metrics (π₀ alone is evaluated by the "
                 "`generate` and `eval` sections).\n")
        (root / "report.png").unlink(missing_ok=True)
    notes = []
    rm_acc = reward_accuracy(reward)
    if (line := accuracy_line(reward)) is not None:
        notes.append(line)
    online = _online_table(root, rows)
    if online:
        notes += ["", "Online training, last logged step (mean ± std over seeds; "
                  "curves in each run's curves.png):", "", online]
    times = {name: mark for name, marker in stages if (mark := _json(Path(marker)))}
    md = [f"# {title}", "", table, *notes, "", stage_times(times)]
    (root / "report.md").write_text("\n".join(md) + "\n")
    result = {
        "metrics": cols,
        "rows": [{"label": row.label, "runs": [r.name for r in row.runs],
                  "stats": {k: {"mean": v[0], "std": v[1], "n": v[2]}
                            for k, v in row.stats.items()}} for row in table_rows],
        "reward_accuracy": rm_acc[0] if rm_acc else None,
        "reward_accuracy_pairs": rm_acc[1] if rm_acc else None, "table": table,
        "stage_seconds": {n: m.get("seconds", 0.0) for n, m in times.items()},
    }
    (root / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def stage_times(marks: dict[str, dict[str, Any]]) -> str:
    """Each stage's wall and CPU seconds with the 1-min load average at its start and end and
    the host's speed when it ran (:mod:`distalign.hostspeed`), so a time measured beside other
    work (load > cores), on a slower host or in a resumed stage (this attempt only) is visible
    as such."""
    lines = ["| stage | wall time (s) | CPU time (s) | load (start → end) | host speed |",
             "|---|---|---|---|---|"]
    for name, m in marks.items():
        cpu = f"{m['cpu_seconds']:.1f}" if "cpu_seconds" in m else "–"
        load = " → ".join(f"{v:.1f}" for v in m["load"]) if m.get("load") else "–"
        note = " (resumed: this attempt)" if m.get("resumed") else ""
        lines.append(f"| {name}{note} | {float(m.get('seconds', 0.0)):.1f} | {cpu} | {load} "
                     f"| {describe(m.get('host'))} |")
    wall = sum(float(m.get("seconds", 0.0)) for m in marks.values())
    lines.append(f"| **total** | {wall:.1f} | "
                 f"{sum(float(m.get('cpu_seconds', 0.0)) for m in marks.values()):.1f} | | |")
    return "\n".join(lines) + "\n"
