"""One process per run directory or generations file: an advisory ``flock`` on a lock file.

The OS drops the lock when its holder exits, however it exits (``kill -9`` included), so no
stale lock is ever left to clean up. The holder writes its pid into the file, so that a second
process can say whom it waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from distalign.errors import ConfigError


def run_dir_lock(run_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """The lock of a run directory, held while a process trains into it: ``.NAME.lock``
    beside it, so that taking it writes nothing into a run that may yet fail to start."""
    d = Path(run_dir)
    return _exclusive(d.with_name(f".{d.name}.lock"), f"run directory {run_dir}")


def file_lock(path: str | Path) -> contextlib.AbstractContextManager[None]:
    """The lock of an output file (``.NAME.lock`` beside it), held while a process writes it."""
    p = Path(path)
    return _exclusive(p.with_name(f".{p.name}.lock"), str(p))


@contextlib.contextmanager
def _exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` for the block; a held lock is a one-line ConfigError naming
    the holder's pid."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write there ({exc.strerror})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"{what} is in use by another distalign process (pid {holder}); "
                              "wait for it to finish, or choose another name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
