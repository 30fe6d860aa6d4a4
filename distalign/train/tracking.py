"""Run directory bookkeeping: metrics.jsonl (always), samples.jsonl, summary.json."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("distalign")

KEY_METRICS = ("loss", "rewards/accuracy", "pref/accuracy", "rm/accuracy", "env/score", "kl/online")


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and samples to
    ``samples.jsonl``. On resume, rows past the restored step are dropped first so the file
    reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool) -> None:
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        if enabled and resume_step is not None:
            for path in (self.metrics_path, self.samples_path):
                self._truncate(path, resume_step)
        self.last: dict[str, Any] = {}

    @staticmethod
    def _truncate(path: Path, step: int) -> None:
        """Keep rows up to ``step``. A line that does not parse (a kill mid-write tears the
        last one) is dropped with a warning: the resumed run rewrites that step."""
        if not path.exists():
            return
        kept, torn = [], 0
        for ln in path.read_text(errors="replace").splitlines():
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(ln)
        if torn:
            log.warning("%s: dropped %d unreadable line(s) (interrupted write)", path, torn)
        path.write_text("".join(f"{ln}\n" for ln in kept))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self.last.update(row)
        if self.enabled:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def write_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        if self.enabled and samples:
            with self.samples_path.open("a") as f:
                for s in samples:
                    f.write(json.dumps({"step": step, **s}) + "\n")


def write_summary(run_dir: Path, cfg: Any, step: int, metrics: dict[str, Any],
                  data: dict[str, Any] | None = None) -> None:
    """``summary.json``: the final step's metrics and what the data loading kept, skipped and
    truncated (``data``: train/eval :class:`~distalign.lm.data.DataReport` fields)."""
    summary = {
        "method": cfg.method,
        "name": cfg.run.name,
        "seed": cfg.run.seed,
        "step": step,
        "metrics": {k: _plain(v) for k, v in metrics.items() if k not in ("step", "time")},
        "data": data or {},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def progress_info(metrics: dict[str, Any]) -> str:
    parts = []
    for key in KEY_METRICS:
        if key in metrics:
            parts.append(f"{key.split('/')[-1]}={_plain(metrics[key]):.4g}")
    return " ".join(parts)
