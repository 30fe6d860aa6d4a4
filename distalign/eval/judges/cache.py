"""On-disk judge cache: one SQLite file, keyed by (judge, template, prompt, A, B).

Each single-order answer is stored with its raw text, unparseable ones included (as null), so
that a rerun reproduces the same evaluation with zero judge calls. Writes are committed per
batch: a crash loses at most the batch in flight. Processes may share one file (SQLite's
locking, WAL journal).
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path


def _key(judge: str, template: str | None, prompt: str, a: str, b: str) -> str:
    blob = json.dumps([judge, template, prompt, a, b], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgeCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # several evaluations (pipeline workers) may share one cache: wait for the lock
        self.db = sqlite3.connect(self.path, timeout=120)
        # Switching a new file to WAL needs an exclusive lock, and SQLite answers "database is
        # locked" at once (no busy wait) when another process is doing the same: retry.
        deadline = time.monotonic() + 120
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, judge TEXT, "
                    "template TEXT, p REAL, raw TEXT)"
                )
                self.db.commit()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05 + 0.1 * random.random())

    def get(self, judge: str, template: str | None, prompt: str, a: str, b: str
            ) -> tuple[float | None, str] | None:
        """(P(A ≻ B) or None, raw answer) when cached, else None."""
        row = self.db.execute(
            "SELECT p, raw FROM answers WHERE key = ?", (_key(judge, template, prompt, a, b),)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def put_many(
        self,
        judge: str,
        template: str | None,
        rows: Iterable[tuple[str, str, str, float | None, str]],
    ) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
            [(_key(judge, template, pr, a, b), judge, template, p, raw)
             for pr, a, b, p, raw in rows],
        )
        self.db.commit()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self.db.close()
