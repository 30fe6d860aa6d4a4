"""How fast this host is right now: a yardstick recorded beside every measured wall time.

The project's machines are shared virtual hosts. The same code measured 6.3 s one day and
9.7 s another on "the same" 2-core machine (``benchmarks/toy_speed.py``), so a wall time means
little without the speed it ran at. Two short probes (well under a second together) give that speed:
float32 matrix products on one core (compute: most of training, prefill and scoring) and a
large array copy (memory bandwidth: decoding and the toy's numpy passes). Medians of several
short repeats, so one preempted repeat does not set the figure. The products are a stack of
small ones on purpose: BLAS runs them on one thread, and a multi-threaded product on a busy
2-core host measured 0.3 GFLOP/s where one thread measured 56.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def host_speed(size: int = 64, stack: int = 64, copy_mib: int = 64, repeats: int = 15
               ) -> dict[str, float]:
    """``{"gflops": …, "gbps": …}``: one core's float32 throughput on ``stack`` products of
    ``size``² matrices, and the bandwidth of copying ``copy_mib`` MiB (read + write)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((stack, size, size), dtype=np.float32)
    b = rng.standard_normal((stack, size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)  # warm-up: thread pool start, page faults
    mm = _median_seconds(lambda: np.matmul(a, b, out=out), repeats)
    src = np.ones(copy_mib * 2**20 // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    cp = _median_seconds(lambda: np.copyto(dst, src), max(3, repeats // 3))
    return {"gflops": round(2 * stack * size**3 / mm / 1e9, 1),
            "gbps": round(2 * src.nbytes / cp / 1e9, 2)}


def describe(speed: dict[str, float] | None) -> str:
    """``"41 GFLOP/s/core, 9.8 GB/s"`` (or ``"–"`` when unmeasured)."""
    if not speed:
        return "–"
    return f"{speed['gflops']:.0f} GFLOP/s/core, {speed['gbps']:.1f} GB/s"
