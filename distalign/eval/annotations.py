"""AlpacaEval annotation files: read, write and aggregate (``distalign eval --annotations``).

The schema is AlpacaEval's: a JSON list of objects with ``instruction``, ``output_1``,
``generator_1`` (the baseline), ``output_2``, ``generator_2`` (the model), ``annotator`` and
``preference`` ∈ [1, 2] (1 + P(output_2 ≻ output_1); null when the judge gave no verdict).
Files may be gzip-compressed (``.json.gz``). Aggregation is :func:`distalign.eval.stats.winrate`,
which reproduces AlpacaEval 2.0's published win-rates exactly (tests/test_alpaca_annotations.py).
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from distalign.errors import DataError
from distalign.eval.stats import winrate

FIELDS = ("instruction", "output_1", "generator_1", "output_2", "generator_2", "annotator",
          "preference")


def read_annotations(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an AlpacaEval annotations file, checked for a numeric-or-null ``preference``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such annotations file")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON annotations file ({exc})") from exc
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: expected a non-empty JSON list of annotation objects")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {i}: not a JSON object")
        if "preference" not in row:
            raise DataError(f"{path} row {i}: missing field 'preference'")
        p = row["preference"]
        if p is not None and (isinstance(p, bool) or not isinstance(p, int | float)):
            raise DataError(f"{path} row {i}: field 'preference' is {p!r}, not a number or null")
    return rows


def aggregate_annotations(rows: list[dict[str, Any]], source: str = "") -> dict[str, Any]:
    """eval.json content for annotation rows: the win-rate of ``generator_2`` vs ``generator_1``.

    Rows whose preference is null/NaN or outside [1, 2] are counted in ``unparsed``.
    """
    prefs = [row.get("preference") for row in rows]
    stats = winrate(prefs)
    lengths = {k: [len(str(r.get(k) or "")) for r in rows] for k in ("output_1", "output_2")}

    def most_common(key: str) -> str | None:
        values = Counter(str(r[key]) for r in rows if r.get(key) is not None)
        return values.most_common(1)[0][0] if values else None

    metrics = {
        "eval/win_rate": stats["win_rate"],
        "eval/win_rate_se": stats["standard_error"],
        "eval/win_rate_discrete": stats["discrete_win_rate"],
        "eval/n": stats["n_total"],
    }
    return {
        "metrics": metrics,
        "source": source,
        "judge": most_common("annotator"),
        "generator": most_common("generator_2"),
        "baseline": most_common("generator_1"),
        "wins": stats["n_wins"],
        "losses": stats["n_wins_base"],
        "ties": stats["n_draws"],
        "unparsed": stats["n_dropped"],
        "win_rate_ci95": [stats["ci_low"], stats["ci_high"]],
        "mean_length_output": _mean(lengths["output_2"]),
        "mean_length_reference": _mean(lengths["output_1"]),
    }


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def write_annotations(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows in the AlpacaEval schema (NaN preferences become null, valid JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = []
    for row in rows:
        p = row.get("preference")
        if isinstance(p, float) and math.isnan(p):
            p = None
        clean.append({**row, "preference": p})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
