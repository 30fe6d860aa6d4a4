"""Ctrl-C and SIGTERM: one line and exit 130 / 143; training first finishes its step and saves.

A signal that arrives mid-update would leave the weights half-updated (some PPO mini-batches
applied, others not), so the first signal only asks the loop to stop at the next step
boundary, where the state is exactly a checkpoint's. A second signal stops at once, losing at
most the steps since the last checkpoint (resume stays exact).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType

from distalign.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_interrupted(signum: int, frame: FrameType | None = None) -> None:
    """The CLI's handler outside the training loop: stop now."""
    raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name}")


class StopAtStepEnd:
    """While active, the first SIGINT/SIGTERM sets :attr:`signum` (the loop polls it); a
    second raises :class:`Interrupted` at once. Handlers are restored on exit. Outside the
    main thread (signals cannot be caught there) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise_interrupted(signum)
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step and saving a "
              "checkpoint (send it again to stop now)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopAtStepEnd:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
