"""``distalign report``: aggregate run directories into a table shaped like the paper's Table 2.

A run directory is what the engine writes (``config.yaml``, ``summary.json``, ``metrics.jsonl``),
plus what ``distalign eval`` wrote into it (``eval/eval.json`` or ``eval.json``, whose metrics
take precedence). Each chosen metric becomes a column of "mean ± std over runs" (the paper:
3 seeds). Values come from ``summary.json``'s ``metrics``; a run without one (killed, or still
running) falls back to the last value of every key in ``metrics.jsonl`` and is *incomplete*:
left out unless asked for, and then marked.

Grouping: by method, and by every config key whose value differs between runs of that method
(seed, names, paths and logging cadence aside), so PMLE β=0 and β=0.1 are two rows, never one
"± std". A row of one run prints its value without "± 0.000" and says "(single run)".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import yaml

from distalign.errors import ConfigError, DataError
from distalign.eval.barplot import plot
from distalign.eval.evaluate import judge_label
from distalign.train.rundir import read_metrics, run_fingerprint

# Table 2's row order; other methods follow alphabetically.
METHOD_ORDER = ("base", "sft", "reward", "dpo", "pmle", "rebel", "distill", "rlhf", "rkl")
METHOD_NAMES = {
    "base": "π₀ (base)", "sft": "SFT", "reward": "Reward model", "dpo": "DPO", "pmle": "PMLE",
    "rebel": "REBEL", "distill": "Pref. Distill.", "rlhf": "RLHF", "rkl": "Reverse KL",
}
# label and direction (↑ higher is better, ↓ lower) of metrics the project logs
KNOWN = {
    "synthetic/win_ref": ("win-rate vs π₀", "↑"),
    "synthetic/win_star": ("win-rate vs π*", "↑"),
    "synthetic/kl_fwd": ("KL(π*‖π)", "↓"),
    "synthetic/kl_rev": ("KL(π‖π*)", "↓"),
    "synthetic/kl_ref": ("KL(π‖π₀)", "↓"),
    "synthetic/entropy": ("entropy", ""),
    "synthetic/leak": ("mass off 𝒜", "↓"),
    "synthetic/rm_kl_fwd": ("KL(π*‖π̃_R)", "↓"),
    "eval/win_rate": ("win-rate %", "↑"),
    "eval/win_rate_discrete": ("discrete win-rate %", "↑"),
    "eval/kl_ref_k3": ("KL(π‖π₀) k3", "↓"),
    "eval/length": ("length (tokens)", ""),
    "eval/rm_score": ("RM score", "↑"),
    "eval/kl_ref": ("KL(π‖π₀)", "↓"),
    "eval/entropy": ("entropy (nats)", ""),
    "env/score": ("RM score", "↑"),
    "env/kl": ("KL(π‖π₀)", "↓"),
    "kl/online": ("KL(π‖π₀)", "↓"),
}
# defaults: what `distalign eval` writes (Table 2's columns) and the synthetic world's exact
# metrics; the engine's training-time estimates only when a run has neither
DEFAULT_CANDIDATES = (
    "synthetic/win_ref", "synthetic/kl_fwd", "synthetic/kl_ref", "eval/win_rate",
    "eval/rm_score", "eval/kl_ref",
)
FALLBACK_CANDIDATES = ("env/score", "env/kl", "kl/online")
# config keys that never make runs different experiments
BOOKKEEPING = {"name", "seed", "output_dir", "resume", "overwrite", "progress", "log_every",
               "save_every", "eval_every", "report_to", "num_samples_logged", "logging_dir"}
EVAL_FILES = ("eval/eval.json", "eval.json")


@dataclass
class Run:
    path: Path
    method: str
    name: str
    seed: int | None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    complete: bool = True  # False: trained but no summary.json (killed or still running)
    stale: bool = False  # its evaluation was made by other weights than its final/ holds


def _is_run(path: Path) -> bool:
    return any((path / f).is_file()
               for f in ("summary.json", "metrics.jsonl", *EVAL_FILES))


def _search(root: Path) -> list[Path]:
    """Run directories under ``root``; a run's own sub-folders (eval/, final/) are not runs."""
    if _is_run(root):
        return [root]
    found: list[Path] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        found.extend(_search(d))
    return found


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each path is a run or is searched recursively."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"no such run directory: {p}")
        found.extend(_search(p))
    runs = sorted(set(found))
    if not runs:
        raise DataError(
            "no run directories (with summary.json, metrics.jsonl or eval.json) under "
            + ", ".join(str(p) for p in paths)
        )
    return runs


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def load_run(path: str | Path) -> Run:
    """Read one run directory (``config.yaml`` + ``summary.json``, else ``metrics.jsonl``)."""
    path = Path(path)
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{path / 'config.yaml'}: cannot parse YAML ({exc})") from exc
    summary: dict[str, Any] = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path / 'summary.json'}: invalid JSON ({exc})") from exc
    raw = dict(summary.get("metrics") or _last_values(path / "metrics.jsonl"))
    stale = False
    current = run_fingerprint(path)
    for name in reversed(EVAL_FILES):  # eval/eval.json (the pipeline's) wins over eval.json
        if (path / name).is_file():
            try:
                ev = json.loads((path / name).read_text())
                if current is not None and ev.get("weights") != current:
                    stale = True  # another model's numbers: never shown as this run's
                    continue
                raw.update(_judged(ev.get("metrics") or {}, ev.get("judge")))
            except (json.JSONDecodeError, AttributeError) as exc:
                raise DataError(f"{path / name}: not an eval.json ({exc})") from exc
    metrics = {k: f for k, v in raw.items() if (f := _numeric(v)) is not None}
    run_cfg = config.get("run", {}) if isinstance(config.get("run"), dict) else {}
    seed = summary.get("seed", run_cfg.get("seed"))
    return Run(
        path=path,
        # a folder with only an evaluation (the pipeline's `base/`, π₀ itself) is named by it
        method=str(summary.get("method") or config.get("method") or path.name),
        name=str(summary.get("name") or run_cfg.get("name") or path.name),
        seed=int(seed) if seed is not None else None,
        config=config,
        metrics=metrics,
        complete=bool(summary) or not (path / "metrics.jsonl").is_file(),
        stale=stale,
    )


def _judged(metrics: dict[str, Any], judge: str | None) -> dict[str, Any]:
    """Win-rates keyed by the judge that made them (``eval/win_rate@reward:rm``), so that runs
    judged differently never share a column and each column names its judge."""
    if not judge:
        return metrics
    label = judge_label(judge)
    return {(f"{k}@{label}" if k.startswith("eval/win_rate") and "@" not in k else k): v
            for k, v in metrics.items()}


def _last_values(path: Path) -> dict[str, Any]:
    """The last logged value of every key in ``metrics.jsonl`` (later rows win)."""
    out: dict[str, Any] = {}
    for row in read_metrics(path.parent):
        out.update(row)
    out.pop("time", None)
    return out


def _lookup(run: Run, key: str) -> str:
    if key in ("method", "name", "seed"):
        return str(getattr(run, key))
    node: Any = run.config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"--group-by {key!r}: not a key of {run.path / 'config.yaml'}")
        node = node[part]
    return str(node)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _settings(run: Run) -> dict[str, str]:
    """The run's config as dotted keys, bookkeeping left out; a seed spelled inside a value
    (``data/n256-s1/pairs.jsonl``) is blanked so that seeds of one setting compare equal."""
    out = {}
    for k, v in _flatten(run.config).items():
        if k == "method" or k.split(".")[-1] in BOOKKEEPING:
            continue
        text = json.dumps(v, sort_keys=True) if isinstance(v, list | dict) else str(v)
        if run.seed is not None:
            text = re.sub(rf"(?<![0-9A-Za-z])(s|seed)[-_=]?{run.seed}(?![0-9])", r"\1*", text)
        out[k] = text
    return out


def differing_keys(runs: list[Run]) -> dict[str, list[str]]:
    """Per method, the config keys whose values differ between its runs (sorted)."""
    by_method: dict[str, list[dict[str, str]]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(_settings(r))
    return {m: sorted(k for k in set().union(*settings)
                      if len({s.get(k) for s in settings}) > 1)
            for m, settings in by_method.items()}


def default_metrics(runs: list[Run]) -> list[str]:
    """Known metrics present in at least one run, in Table 2's spirit (quality, then KL)."""
    present = set().union(*(r.metrics for r in runs))
    picked = [j for m in DEFAULT_CANDIDATES
              for j in ([m] if m in present else []) + sorted(
                  k for k in present if k.startswith(f"{m}@") and k.count("/") == 1
                  and not k.partition("@")[0].endswith(("_se", "_discrete")))]
    if not picked:
        picked = [m for m in FALLBACK_CANDIDATES if m in present]
    kl = [m for m in picked if "kl" in m]
    # one KL-to-π₀ column is enough; keep the exact one when both exist
    if len(kl) > 1:
        keep = {"synthetic/kl_fwd", kl[0] if kl[0] != "synthetic/kl_fwd" else kl[1]}
        picked = [m for m in picked if "kl" not in m or m in keep]
    if not picked:
        raise ConfigError(
            "none of the usual metrics are in these runs; pick some with --metrics "
            f"(available: {', '.join(sorted(present)[:20])})"
        )
    return picked


@dataclass
class Row:
    label: str
    runs: list[Run]
    stats: dict[str, tuple[float, float, int]]  # metric -> (mean, std, count)

    @property
    def incomplete(self) -> int:
        return sum(not r.complete for r in self.runs)


def aggregate(runs: list[Run], metrics: list[str], group_by: list[str] | None = None) -> list[Row]:
    """Group runs and take mean ± std (sample std; 0 for one run, printed without ±).

    ``group_by=None``: by method plus :func:`differing_keys` (see the module docstring)."""
    present = set().union(*(r.metrics for r in runs))
    missing = [m for m in metrics if m not in present]
    if missing:
        raise ConfigError(
            f"metric {missing[0]!r} is in none of the runs (available: "
            f"{', '.join(sorted(present)[:20])})"
        )
    groups: dict[tuple[str, ...], list[Run]] = {}
    labels: dict[tuple[str, ...], str] = {}
    differ = differing_keys(runs) if group_by is None else {}
    for r in runs:
        if group_by is None:  # method, then the settings that set its runs apart
            keys = ["method", *differ[r.method]]
            values = [r.method, *(_settings(r).get(k, "–") for k in keys[1:])]
        else:
            keys, values = group_by, [_lookup(r, k) for k in group_by]
        key = tuple(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        groups.setdefault(key, []).append(r)
        labels[key] = _label(tuple(values), keys)
    first = "method" if group_by is None else group_by[0]

    def order(key: tuple[str, ...]) -> tuple:
        m = key[0].partition("=")[2] if first == "method" else ""
        rank = METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
        return (rank, key)

    rows = []
    for key in sorted(groups, key=order):
        members = groups[key]
        stats = {}
        for m in metrics:
            vals = [r.metrics[m] for r in members if m in r.metrics and math.isfinite(r.metrics[m])]
            if vals:
                stats[m] = (mean(vals), stdev(vals) if len(vals) > 1 else 0.0, len(vals))
        rows.append(Row(labels[key], members, stats))
    return rows


def _label(key: tuple[str, ...], group_by: list[str]) -> str:
    parts = []
    for k, v in zip(group_by, key, strict=True):
        # the whole key: `algo.beta=0.1`, never a bare `beta` that two sections may share
        parts.append(METHOD_NAMES.get(v, v) if k == "method" else f"{k}={v}")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


def metric_label(metric: str) -> str:
    """A column's title: ``eval/win_rate@hf`` → ``win-rate % ↑ [hf]`` (a judge after ``@``)."""
    key, _, judge = metric.partition("@")
    if key not in KNOWN:
        return metric
    name, arrow = KNOWN[key]
    return f"{name} {arrow}".strip() + (f" [{judge}]" if judge else "")


# k1 KL estimates (mean ln π − ln π₀ over samples, may be < 0) and their standard errors
K1_SE = {"eval/kl_ref": "eval/kl_ref_se"}
K1_NOTE = ("KL(π‖π₀) is the k1 estimate: the Monte-Carlo mean of ln π(y|x) − ln π₀(y|x) over "
           "sampled replies. The true KL is ≥ 0; a negative estimate is sampling noise, and one "
           "within its standard error (SE) of 0 is indistinguishable from π₀.")


def _fixed(x: float, digits: int) -> str:  # never "-0.000"
    return text[1:] if (text := f"{x:.{digits}f}").startswith("-") and float(text) == 0 else text


def _cell(mu: float, sd: float, n: int, digits: int) -> str:
    # one run has no spread: print its value alone, never "± 0.000"
    return _fixed(mu, digits) if n < 2 else f"{_fixed(mu, digits)} ± {sd:.{digits}f}"


def _metric_cell(row: Row, m: str, digits: int) -> tuple[str, bool]:
    """(the cell, whether it is a negative k1 estimate: those show their standard error, the
    runs' SEs combined as independent samples, and get a note under the table)."""
    if m not in row.stats:
        return "–", False
    text = _cell(*row.stats[m], digits)
    if m not in K1_SE or not text.startswith("-"):
        return text, False
    ses = [r.metrics.get(K1_SE[m]) for r in row.runs if m in r.metrics]
    if ses and None not in ses:
        se = math.sqrt(sum(v * v for v in ses if v is not None)) / len(ses)
        text += f" (SE {se:.{digits}f})"
    return text, True


def _runs_cell(row: Row) -> str:
    n = len(row.runs)
    stale = sum(r.stale for r in row.runs)
    notes = (["single run"] if n == 1 else []) + (
        [f"{row.incomplete} incomplete"] if row.incomplete else []) + (
        [f"{stale} evaluated by older weights: eval left out, rerun generate and eval"]
        if stale else [])
    return f"{n}" + (f" ({', '.join(notes)})" if notes else "")


def markdown(rows: list[Row], metrics: list[str], digits: int = 3) -> str:
    """``| Algorithm | metric ↑ | ... |`` with "mean ± std" cells and the run count; a negative
    k1 KL cell shows its standard error, with a note under the table on what it means."""
    head = "| Algorithm | " + " | ".join(metric_label(m) for m in metrics) + " | runs |"
    lines = [head, "|---" * (len(metrics) + 2) + "|"]
    negative = False
    for row in rows:
        cells = [_metric_cell(row, m, digits) for m in metrics]
        negative |= any(neg for _, neg in cells)
        lines.append(f"| {row.label} | " + " | ".join(c for c, _ in cells)
                     + f" | {_runs_cell(row)} |")
    return "\n".join(lines + (["", K1_NOTE] if negative else [])) + "\n"


def report(
    paths: list[str | Path],
    metrics: list[str] | None = None,
    group_by: list[str] | None = None,
    plot_path: str | Path | None = None,
    include_incomplete: bool = False,
) -> tuple[str, list[Row]]:
    """Find, load and aggregate runs; returns (markdown, rows) and writes the plot if asked.

    Incomplete runs (no ``summary.json``) are left out, with a note under the table, unless
    ``include_incomplete``; then they count and their rows say so."""
    found = [load_run(p) for p in find_runs(list(paths))]
    runs = [r for r in found if r.complete or include_incomplete]
    left_out = [r for r in found if r not in runs]
    if not runs:
        raise DataError("every run found is incomplete (no summary.json); pass "
                        "--include-incomplete to report their last logged values")
    metrics = metrics or default_metrics(runs)
    rows = aggregate(runs, metrics, group_by)
    if plot_path is not None:
        plot(rows, metrics, plot_path, [metric_label(m) for m in metrics])
    table = markdown(rows, metrics)
    if left_out:
        table += ("\nLeft out (incomplete, no summary.json; --include-incomplete to add): "
                  + ", ".join(str(r.path) for r in left_out) + "\n")
    return table, rows
