"""What a run directory already holds, and whether this config may continue it.

A run directory belongs to one configuration. Rerunning the same ``run.name`` continues that
run (from its newest checkpoint) only when the resolved configs agree on everything but the
horizon and logging settings; anything else would splice two different runs into one
``metrics.jsonl``. Nothing is deleted before the models have loaded (:func:`clear_run`), so a
rerun that fails early leaves the previous run intact.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distalign.errors import ConfigError
from distalign.train.checkpoint import latest_checkpoint

log = logging.getLogger("distalign")

# Settings that may change between a run and its continuation: how long it runs and what it
# logs, never what it computes.
HORIZON_KEYS = frozenset({
    "run.max_steps", "run.epochs", "run.log_every", "run.eval_every", "run.eval_at_start",
    "run.save_every", "run.keep_checkpoints", "run.progress", "run.resume", "run.overwrite",
    "run.report_to", "run.num_samples_logged", "data.num_proc",
})
# What one run writes into its directory (and --overwrite removes).
ARTIFACTS = ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", "summary.json",
             "config.yaml")
CONFIG_NAME = "config.yaml"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["key: old → new", ...]`` for settings that change what a run computes."""
    a, b = _flat(old), _flat(new)
    keys = sorted(set(a) | set(b), key=lambda k: (k != "method", k))
    return [f"{k}: {a.get(k, '<unset>')!r} → {b.get(k, '<unset>')!r}"
            for k in keys if k not in HORIZON_KEYS and a.get(k) != b.get(k)]


@dataclass
class RunPlan:
    """``resume_from``: the checkpoint to continue from; ``clear``: the old run's artifacts
    must go (after the models have loaded) because this run starts over."""

    resume_from: Path | None
    clear: bool
    reason: str = ""


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        loaded = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    return loaded if isinstance(loaded, dict) else None


def plan_run(run_dir: Path, resolved: dict[str, Any], resume: bool, overwrite: bool) -> RunPlan:
    """Decide how this run treats ``run_dir``; raise a one-line ConfigError instead of losing
    or mixing data. Reads only (every process may call it)."""
    present = [a for a in ARTIFACTS if (run_dir / a).exists()]
    if overwrite:
        return RunPlan(None, bool(present), "run.overwrite=true")
    if not present:
        return RunPlan(None, False)
    ckpt = latest_checkpoint(run_dir)
    # the checkpoint's own copy of the config is the one its weights belong to
    old = (_read_yaml(ckpt / CONFIG_NAME) if ckpt else None) or _read_yaml(run_dir / CONFIG_NAME)
    if old is not None:
        diff = config_difference(old, resolved)
        if diff:
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            raise ConfigError(
                f"{run_dir} holds a run with another config ({'; '.join(diff[:3])}{more}); "
                "rerun with --overwrite (run.overwrite=true) to replace it, or choose another "
                "run.name"
            )
    if not resume:
        return RunPlan(None, True, "run.resume=false")
    if ckpt is not None:
        return RunPlan(ckpt, False)
    if (run_dir / "summary.json").exists():
        raise ConfigError(
            f"{run_dir} holds a finished run with no checkpoint to continue from "
            "(run.save_every=0); rerun with --overwrite (run.overwrite=true) to train it "
            "again, or choose another run.name"
        )
    return RunPlan(None, True, "an interrupted run without checkpoints")


def clear_run(run_dir: Path, reason: str) -> None:
    """Remove a previous run's artifacts (main process, after the models have loaded)."""
    gone = []
    for name in ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        gone.append(name)
    if gone:
        log.warning("%s: starting over (%s); removed %s", run_dir, reason, ", ".join(gone))
