"""Reading data files so that every defect is one line naming the file, line and field.

The ``datasets`` builders answer a stray byte or a torn JSON line with a deep traceback
(or a message without a line number), and fill a missing key with null, which then reads
as "empty". Local JSON/JSONL/CSV files are therefore scanned first: encoding, JSON syntax,
one object per line, and which keys each row lacks (so ``prepare`` can say "missing" rather
than "empty"). ``data.columns`` renames the file's columns to the names the loaders read.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from typing import Any

from datasets import Dataset, load_dataset

from distalign.errors import ConfigError, DataError
from distalign.lm.sources import check_hub, did_you_mean, looks_local

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_JSON_TYPES = {str: "text", int: "a number", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object"}
COLUMN_NAMES = ("prompt", "chosen", "rejected", "completion", "messages")


def builder_for(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return next((b for ext, b in BUILDERS.items() if name.endswith(ext)), None)


def _read_bytes(path: str) -> bytes:
    if path.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from e
    with open(path, "rb") as f:
        return f.read()


def _decode(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path} line {line}: byte 0x{raw[e.start]:02x} at column {col} is "
                        "not UTF-8 (re-encode the file as UTF-8)") from None


def _json_rows(path: str, text: str) -> list[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line; a .json file may hold one array."""
    if path.lower().removesuffix(".gz").endswith(".json"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines in a .json file: read line by line below
        if isinstance(whole, list):
            return [(k + 1, v) for k, v in enumerate(whole)]
        if whole is not None:
            return [(1, whole)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}; "
                            "a truncated line?)") from None
    return rows


Scan = tuple[dict[int, frozenset[str]], tuple[int, ...] | None]


@functools.lru_cache(maxsize=8)
def _scan(path: str, mtime_ns: int, size: int) -> Scan:
    """({row: keys it lacks}, each row's line in a JSON Lines file, else None)."""
    if size == 0:
        raise DataError(f"{path}: the file is empty")
    if builder_for(path) == "parquet":  # binary: pyarrow reports its own defects
        return {}, None
    text = _decode(path, _read_bytes(path))
    if builder_for(path) != "json":
        return {}, None
    rows = _json_rows(path, text)
    if not rows:
        raise DataError(f"{path}: the file has no rows (only blank lines)")
    keys: set[str] = set()
    kinds: dict[str, tuple[str, int]] = {}  # key -> (JSON type, first line with it)
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected a JSON object per row, got "
                            f"{type(row).__name__}")
        keys |= row.keys()
        for k, v in row.items():  # arrow needs one type per column; say where it changes
            if v is None:
                continue
            t = _JSON_TYPES.get(type(v), type(v).__name__)
            first = kinds.setdefault(k, (t, n))
            if first[0] != t:
                raise DataError(f"{path} line {n}: field {k!r} is {t}, but it is {first[0]} "
                                f"on line {first[1]} (one type per column)")
    if not keys:
        raise DataError(f"{path}: no rows (every row is an empty object)")
    missing = {i: frozenset(keys - row.keys()) for i, (_, row) in enumerate(rows)
               if keys - row.keys()}
    array = text.lstrip().startswith("[")  # a JSON array's rows have no lines of their own
    return missing, None if array else tuple(n for n, _ in rows)


def _checked(path: str) -> Scan:
    if not os.path.isfile(path):
        return {}, None
    if builder_for(path) is None:
        raise DataError(f"{path}: unsupported file type; use .jsonl, .json, .parquet or .csv "
                        "(optionally .gz)")
    st = os.stat(path)
    return _scan(path, st.st_mtime_ns, st.st_size)


def check_file(path: str) -> dict[int, frozenset[str]]:
    """Validate a local data file; returns {row number: keys that row lacks} (JSON files)."""
    return _checked(path)[0]


def row_lines(path: str) -> list[int] | None:
    """The line of each row of a local JSON Lines file (rows skip blank lines), else None."""
    lines = _checked(path)[1]
    return list(lines) if lines is not None else None


def check_columns(columns: dict[str, str]) -> None:
    for ours in columns:
        if ours not in COLUMN_NAMES:
            raise ConfigError(f"data.columns.{ours}: unknown column name; map one of "
                              f"{', '.join(COLUMN_NAMES)} (e.g. data.columns.prompt=question)")


def rename(ds: Dataset, columns: dict[str, str], path: str) -> Dataset:
    """Apply ``data.columns`` (our name → the file's column name)."""
    for ours, theirs in columns.items():
        if theirs not in ds.column_names:
            raise DataError(f"data.columns.{ours}={theirs!r}: {path} has no column {theirs!r} "
                            f"(columns: {sorted(ds.column_names)})")
        if ours in ds.column_names and ours != theirs:
            ds = ds.remove_columns(ours)  # the mapped column replaces a same-named one
    mapping = {theirs: ours for ours, theirs in columns.items() if ours != theirs}
    return ds.rename_columns(mapping) if mapping else ds


def missing_fields(path: str, columns: dict[str, str]) -> dict[int, frozenset[str]]:
    """Rows' missing keys, under the names the loaders read (``data.columns`` applied)."""
    back = {theirs: ours for ours, theirs in columns.items()}
    return {i: frozenset(back.get(k, k) for k in ks) for i, ks in check_file(path).items()}


def check_data_source(path: str, subset: str | None = None) -> None:
    """Fail in one line, before any hub request, when ``path`` is a missing local file or
    directory (naming the closest names there) or a hub dataset that neither the cache nor
    the hub has. ``subset`` (a hub dataset's config) is refused for a single file."""
    builder = builder_for(path)
    if builder is not None and not os.path.isfile(path):
        raise DataError(f"data file not found: {path}{did_you_mean(path)}")
    if subset is not None and builder is not None:
        raise ConfigError(f"data.subset={subset!r}: {path} is a single file, which has no "
                          "dataset configs")
    if builder is None and not os.path.exists(path):
        if looks_local(path):
            raise DataError(f"data file not found: {path}{did_you_mean(path)}")
        check_hub(path, "dataset", "dataset")


def load_rows(cfg: Any, split: str | None = None, *, path: str | None = None) -> Dataset:
    """Raw rows of ``path`` (default ``cfg.path``), split ``split`` (default ``cfg.split``), cut to
    ``cfg.max_rows``: files via the json/parquet/csv builders, else ``load_dataset(path)`` with
    ``cfg.subset`` as its config name (for ``cfg.path`` only, not a separate eval_path)."""
    path, split = path or cfg.path, split or cfg.split
    subset = getattr(cfg, "subset", None) if path == cfg.path else None
    builder = builder_for(path)
    check_data_source(path, subset)
    if builder is not None and split.split("[")[0] != "train":
        raise ConfigError(f"{path} is a single file, so its only split is 'train' (got {split!r}); "
                          "give a separate file as data.eval_path")
    check_file(path)
    try:
        ds = (load_dataset(path, subset, split=split) if builder is None
              else load_dataset(builder, data_files=path, split=split))
    except Exception as e:  # datasets/arrow/hub raise many types; all mean "cannot read this"
        first = (str(e).strip().splitlines() or [""])[0]
        what = f"split {split!r}" + (f", subset {subset!r}" if subset else "")
        msg = f"could not load {path!r} ({what}): {type(e).__name__}: {first}"
        raise DataError(msg) from e
    ds = rename(ds, dict(getattr(cfg, "columns", None) or {}), path)
    if cfg.max_rows is not None and len(ds) > cfg.max_rows:
        ds = ds.select(range(cfg.max_rows))
    return ds
