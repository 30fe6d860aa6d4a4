"""How many CPU threads torch's operators use: ``run.threads`` (train), ``--threads``
(generate, eval).

torch starts one intra-op thread per core whatever else runs there. On a shared 2-core host
at load 8-11, ``generate`` of 8 prompts (SmolLM2-135M, 32 tokens) took 111-186 s with torch's
2 threads and 29-59 s with one, for the same tokens (issue 20 saw 196 s and 14.5 s): each
operator waits for its slowest thread, and a thread that shares its core with another process
is slow. The default therefore takes the cores this process may use
(its CPU affinity), shares them among the processes that ``accelerate launch`` started on this
node, and leaves out the cores that other work keeps busy (the 1-minute load average).
"""

from __future__ import annotations

import logging
import os

from distalign.errors import ConfigError

logger = logging.getLogger(__name__)

THREADS_HELP = ("torch CPU threads (default: $OMP_NUM_THREADS, else the cores this process may "
                "use, less those that other work keeps busy by the load average; on a loaded "
                "2-core host 1 thread generated 13x faster than torch's default of 2)")


def default_threads() -> tuple[int, str]:
    """(threads, why): ``OMP_NUM_THREADS`` when set, else the cores this process may use, per
    local process, less those the load average says are busy; at least 1."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # set by accelerate/torchrun
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, cores - round(load))
    threads = max(1, min(cores, idle) // procs)
    return threads, f"{cores} cores, {procs} process(es), load {load:.1f}"


def set_threads(threads: int | None, what: str = "--threads") -> tuple[int, str]:
    """Apply ``threads`` (None: :func:`default_threads`) with ``torch.set_num_threads`` before
    any work starts; returns (threads, why) for the caller to show."""
    import torch

    if threads is not None and threads < 1:
        raise ConfigError(f"{what} must be >= 1, got {threads}")
    why = what
    if threads is None:
        threads, why = default_threads()
    torch.set_num_threads(threads)
    logger.debug("torch CPU threads: %d (%s)", threads, why)
    return threads, why
