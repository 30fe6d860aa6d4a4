"""The generations file of the evaluation contract: written by ``distalign generate``, read by
``distalign eval``, the pipeline and the tests. One reader, so that both sides agree on what a
row is and on a torn last line (a write killed halfway: it has no newline, and is ignored)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distalign.errors import DataError


def sidecar_path(generations: str | Path) -> Path:
    """``gens.jsonl`` → ``gens.meta.json`` next to it."""
    p = Path(generations)
    return p.with_name(p.name.removesuffix(".jsonl") + ".meta.json")


def numbered_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(0-based line index, row) of every complete line; each row names its prompt and sample."""
    data = Path(path).read_bytes()
    rows = []
    for i, raw in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            (str(row["prompt_id"]), int(row["sample"]))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} line {i + 1}: not a generations row ({type(e).__name__}: "
                            f"{e}); the file is damaged") from e
        rows.append((i, row))
    return rows


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a generations file (a torn last line is ignored)."""
    return [row for _, row in numbered_rows(path)]
