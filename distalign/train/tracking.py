"""Run directory bookkeeping: metrics.jsonl (always), samples.jsonl, summary.json."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from distalign.train.rundir import read_jsonl_rows

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
        """Keep rows up to ``step`` (a torn last line goes too: the resumed run rewrites it)."""
        if not path.exists():
            return
        rows, torn = read_jsonl_rows(path)
        if torn:
            log.warning("%s: dropped an unreadable last line (interrupted write)", path)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))

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


class SampleRecorder:
    """Wraps the run's sampler: times generation and keeps the rollouts of the current step,
    so that the engine (not the method) logs what training sampled. Other attributes (e.g. a
    vLLM sampler's ``sync``) pass through."""

    def __init__(self, sampler: Any) -> None:
        self.sampler, self.rollouts, self.seconds = sampler, [], 0.0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self.sampler.generate(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.rollouts.append(out)
        return out

    def take(self) -> tuple[list[Any], float]:
        """(rollouts, generation seconds) since the last call; resets both."""
        out = (self.rollouts, self.seconds)
        self.rollouts, self.seconds = [], 0.0
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


def decode_samples(tokenizer: Any, rollout: Any, k: int) -> list[dict[str, Any]]:
    """The first ``k`` rows of a rollout as text, for ``samples.jsonl``."""
    p = rollout.prompt_length
    return [
        {
            "prompt": tokenizer.decode(rollout.input_ids[i, :p], skip_special_tokens=True),
            "response": tokenizer.decode(
                rollout.input_ids[i, p:][rollout.response_mask[i, p:].bool()],
                skip_special_tokens=True,
            ),
            "ended": bool(rollout.ended[i]),
        }
        for i in range(min(k, rollout.input_ids.shape[0]))
    ]


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


PHASES = ("generate", "score", "update", "other")


def progress_info(metrics: dict[str, Any]) -> str:
    parts = []
    for key in KEY_METRICS:
        if key in metrics:
            parts.append(f"{key.split('/')[-1]}={_plain(metrics[key]):.4g}")
    if metrics.get("time/generate", 0) > 0:  # online runs: where the step's time went
        parts.append("time " + " ".join(f"{p[:3]}={metrics[f'time/{p}']:.2f}s" for p in PHASES))
    return " ".join(parts)
