"""The ``data`` stage's input: which preference layout a pairs file holds, checked at plan time
(``--dry-run`` included) from its first row, so a file the later stages cannot read is refused
before anything runs.

Accepted layouts (TRL's preference forms and Anthropic HH):

* ``hh``: ``chosen``/``rejected`` transcripts with ``"\\n\\nAssistant:"`` turns;
* ``preference``: ``prompt``/``chosen``/``rejected``, as text or ``{role, content}`` message
  lists; also ``chosen``/``rejected`` message lists without a prompt (TRL's implicit prompt),
  which the split rewrites with an explicit ``prompt`` (the turns before the last) as TRL's
  ``extract_prompt`` does, so generation finds the prompt the training data holds.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from distalign.errors import ConfigError, DataError

HH_ASSISTANT = "\n\nAssistant:"
SPLIT_FORMATS = ("auto", "hh", "preference")
EXPECTED = ("expected JSON lines of prompt/chosen/rejected (text or {role, content} message "
            "lists), chosen/rejected message lists, or Anthropic HH chosen/rejected transcripts")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def row_format(row: Any, where: str) -> str:
    """``hh`` or ``preference`` for one row; a one-line DataError naming the expected forms."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: not a JSON object; {EXPECTED}")
    if not {"chosen", "rejected"} <= set(row):
        raise DataError(f"{where}: found columns {sorted(row)}; {EXPECTED}")
    chosen = row["chosen"]
    if "prompt" in row:
        return "preference"
    if _is_messages(chosen):
        return "preference"
    if isinstance(chosen, str) and HH_ASSISTANT in chosen:
        return "hh"
    raise DataError(f"{where}: chosen/rejected text without a 'prompt' column and without HH "
                    f"{HH_ASSISTANT!r} turns, so prompt and reply cannot be told apart; "
                    f"{EXPECTED}")


def first_row(source: str) -> dict[str, Any]:
    """The first non-blank JSON line of a ``.jsonl`` or ``.jsonl.gz`` file."""
    opener = gzip.open if source.endswith(".gz") else open
    try:
        with opener(source, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        return json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{source} line {i + 1}: invalid JSON ({exc.msg}); "
                                        f"{EXPECTED}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: cannot read it as JSON lines ({exc}); {EXPECTED}") from None
    raise DataError(f"{source}: no rows (empty file)")


def split_format(source: str, declared: str) -> str:
    """The layout of ``source`` (``hh`` or ``preference``); a declared format that disagrees
    with the file is a ConfigError, since every later stage would misread it."""
    if declared not in SPLIT_FORMATS:
        raise ConfigError(f"data.split.format={declared!r}: expected one of "
                          f"{', '.join(SPLIT_FORMATS)}")
    found = row_format(first_row(source), f"{source} line 1")
    if declared not in ("auto", found):
        what = "HH transcripts" if found == "hh" else "prompt/chosen/rejected preference rows"
        raise ConfigError(f"data.split.format={declared}, but {source} holds {what}: set "
                          f"data.split.format to auto (or {found})")
    return found


def normalise(rows: list[dict[str, Any]], fmt: str, source: str
              ) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """``[(source position, row)]`` in one layout, and the number of rows left out: implicit-
    prompt message lists become explicit ``prompt``/``chosen``/``rejected`` (rows whose two
    dialogues differ before the last turn have no common prompt: left out, as training would
    skip them). A row in another layout than the file's first is a DataError."""
    out, dropped = [], 0
    for i, row in enumerate(rows):
        where = f"{source} line {i + 1}"
        if row_format(row, where) != fmt:
            raise DataError(f"{where}: another layout than the file's first row ({fmt})")
        if fmt == "hh" or "prompt" in row:
            out.append((i, row))
            continue
        c, r = row["chosen"], row["rejected"]
        if (not _is_messages(r) or c[:-1] != r[:-1] or not c[:-1]
                or c[-1].get("role") != "assistant"):
            dropped += 1
            continue
        rest = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
        out.append((i, {**rest, "prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]}))
    return out, dropped


def check_writable(path: Path, what: str, create: bool) -> None:
    """A one-line ConfigError when ``path`` cannot become a writable directory (a file in the
    way, no permission, a read-only file system); with ``create``, it is made."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: is a file, not a directory")
    if not create:  # nothing may be written (--dry-run): check the nearest existing folder
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{what} {path}: cannot write there ({existing} is a file)")
        if not os.access(existing, os.W_OK):
            raise ConfigError(f"{what} {path}: cannot write there ({existing} is read-only)")
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot write there ({exc.strerror})") from None
