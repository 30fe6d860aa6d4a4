"""Progress reporting for long jobs (training, generation, judging) that works everywhere.

On a terminal it is a rich bar with ETA. Off one (``> log.txt``, nohup, slurm, CI) a live bar
would print nothing until the end, so it writes one plain line every ``every`` steps instead:
batch logs then show step, elapsed time, ETA and the key metrics as the job goes.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class StepProgress:
    """``with StepProgress("dpo", total=100) as p: p.update(step, info="loss=0.69")``.

    ``enabled=False`` prints nothing. ``every`` is the plain-line cadence off a terminal
    (the final step is always printed). ``file`` defaults to stdout.
    """

    def __init__(
        self,
        description: str,
        total: int,
        completed: int = 0,
        *,
        enabled: bool = True,
        every: int = 1,
        file: IO[str] | None = None,
        force_terminal: bool | None = None,
    ) -> None:
        self.description, self.total, self.enabled = description, total, enabled
        self.every = max(int(every), 1)
        self.file = file or sys.stdout
        self.console = Console(file=self.file, force_terminal=force_terminal)
        self.live = enabled and self.console.is_terminal
        self._start, self._first = time.perf_counter(), completed
        self._last_printed = completed
        self._bar: Progress | None = None
        self._task: Any = None
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            # every field a column reads must exist before the first render
            self._task = self._bar.add_task(description, total=total, completed=completed, info="")

    def __enter__(self) -> StepProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def note(self, text: str) -> None:
        """A line of its own (e.g. the data summary), above the bar on a terminal."""
        if not self.enabled or not text:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.file, flush=True)

    def update(self, completed: int, info: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=info)
            return
        due = completed - self._last_printed >= self.every or completed >= self.total
        if due and completed > self._last_printed:
            self._last_printed = completed
            print(self.line(completed, info), file=self.file, flush=True)

    def line(self, completed: int, info: str = "") -> str:
        """The plain progress line: ``dpo 12/100 elapsed 0:00:31 eta 0:03:47 loss=0.69``."""
        elapsed = time.perf_counter() - self._start
        done = completed - self._first
        eta = elapsed / done * (self.total - completed) if done > 0 else float("nan")
        eta_s = _clock(eta) if eta == eta else "?"
        parts = [self.description, f"{completed}/{self.total}", f"elapsed {_clock(elapsed)}",
                 f"eta {eta_s}"]
        return " ".join(parts + ([info] if info else []))


def quiet_libraries() -> None:
    """Our progress bar is the run's; silence per-load bars from HF libraries."""
    import logging
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # peft asks for the property that transformers 5 renamed; the warning names no action
    # for our users and would open every log
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)
    # a GGUF base has no config.json beside it; peft then checks nothing it could report
    warnings.filterwarnings("ignore", message="Could not find a config file in",
                            category=UserWarning)
    # tied embeddings (SmolLM2, Llama-style heads) are saved once, as they should be; accelerate
    # warns about it at every checkpoint
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    # six "[RANK 0] Saving ..." lines per checkpoint would break the progress bar
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)
