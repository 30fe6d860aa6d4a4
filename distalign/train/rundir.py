"""The run directory: what it holds, whether this config may continue it, and how others read it.

A run directory belongs to one configuration. Rerunning the same ``run.name`` continues that
run (from its newest checkpoint) only when the resolved configs agree on everything but the
horizon and logging settings; anything else would splice two different runs into one
``metrics.jsonl``. Nothing is deleted before the models have loaded (:func:`clear_run`), so a
rerun that fails early leaves the previous run intact. Starting over also removes what was
derived from the old weights (generations, evaluations): they would describe another model.

Everything else reads a run through this module: :func:`read_metrics` (one torn-line policy),
:func:`is_finished` and :func:`run_fingerprint` (what generations and evaluations record).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distalign.errors import ConfigError, DataError, DistalignError
from distalign.lm.fingerprint import weights_fingerprint
from distalign.train.checkpoint import latest_checkpoint
from distalign.train.config import default_config

log = logging.getLogger("distalign")

# Settings that may change between a run and its continuation: how long it runs and what it
# logs, never what it computes.
HORIZON_KEYS = frozenset({
    "run.max_steps", "run.epochs", "run.log_every", "run.eval_every", "run.eval_at_start",
    "run.save_every", "run.keep_checkpoints", "run.progress", "run.resume", "run.overwrite",
    "run.report_to", "run.num_samples_logged", "data.num_proc",
})
# What one run writes into its directory, then what commands derive from its weights there;
# --overwrite removes both (a generations file anywhere also carries the weights' fingerprint).
ARTIFACTS = ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", "summary.json",
             "config.yaml")
DERIVED = ("eval", "model_outputs.json")
CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"


def read_jsonl_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(rows, 1 if the last line was torn else 0) of a JSON-lines log. Logs are only appended
    to, so a kill mid-write can tear the last line alone: it is skipped (the resumed run
    rewrites that step). An unreadable line anywhere else means a damaged file: DataError."""
    if not path.is_file():
        return [], 0
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                return rows, 1
            raise DataError(f"{path} line {i + 1}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {i + 1}: not a JSON object")
        rows.append(row)
    return rows, 0


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (torn lines skipped, see :func:`read_jsonl_rows`)."""
    return read_jsonl_rows(Path(run_dir) / "metrics.jsonl")[0]


def is_finished(run_dir: str | Path, config_yaml: str | None = None) -> bool:
    """The run wrote its summary (it trained to the end and saved ``final/``); with
    ``config_yaml``, only if it ran this very config."""
    d = Path(run_dir)
    if not (d / SUMMARY_NAME).is_file() or not (d / "final").is_dir():
        return False
    return config_yaml is None or (
        (d / CONFIG_NAME).is_file() and (d / CONFIG_NAME).read_text() == config_yaml)


def run_fingerprint(run_dir: str | Path) -> str | None:
    """The fingerprint of the run's ``final/`` weights (None before it has one)."""
    final = Path(run_dir) / "final"
    return weights_fingerprint(final) if (final / "config.json").is_file() else None


def _derived_generations(run_dir: Path) -> list[Path]:
    """Generations files (and their sidecars and locks) inside the run directory."""
    out = []
    for meta in run_dir.glob("*.meta.json"):
        gens = meta.with_name(meta.name.removesuffix(".meta.json") + ".jsonl")
        out += [p for p in (meta, gens) if p.exists()]
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["key: old → new", ...]`` for settings that change what a run computes. A setting that
    the old run's config lacks (added to distalign since) counts as its default."""
    a, b = _flat(old), _flat(new)
    if isinstance(new.get("method"), str):
        try:
            defaults = _flat(default_config(new["method"]))
        except DistalignError:  # an unknown method: nothing to fill in
            defaults = {}
        a = {**{k: v for k, v in defaults.items() if k in b}, **a}
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
    present = [a for a in (*ARTIFACTS, *DERIVED) if (run_dir / a).exists()]
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
    if (run_dir / SUMMARY_NAME).exists():
        raise ConfigError(
            f"{run_dir} holds a finished run with no checkpoint to continue from "
            "(run.save_every=0); rerun with --overwrite (run.overwrite=true) to train it "
            "again, or choose another run.name"
        )
    return RunPlan(None, True, "an interrupted run without checkpoints")


def clear_run(run_dir: Path, reason: str) -> None:
    """Remove a previous run's artifacts (main process, after the models have loaded)."""
    gone = []
    for path in [*(run_dir / a for a in (*ARTIFACTS, *DERIVED)), *_derived_generations(run_dir)]:
        name = path.name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        gone.append(name)
    if gone:
        log.warning("%s: starting over (%s); removed %s", run_dir, reason, ", ".join(gone))
