"""Strict JSON for results files: Python's ``json`` writes NaN and ±inf as bare ``NaN`` and
``Infinity``, which other JSON readers reject. Below every layer, so that every writer of a
results file (eval.json, the toy's results.json) uses this one rule; and the one rule for
append-only JSONL files that a ``kill -9`` can leave with a torn last line.

>>> json_safe({"kl": float("nan"), "xs": (1.0, float("inf")), "n": 3})
{'kl': None, 'xs': [1.0, None], 'n': 3}
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON null), recursively through
    dicts, lists and tuples (tuples become lists, as ``json`` writes them anyway)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def cut_torn_line(path: Path) -> int:
    """Remove a last line that has no newline (a write killed halfway); returns its bytes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < size:
        os.truncate(path, keep)
    return size - keep
