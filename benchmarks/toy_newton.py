"""The toy's Newton solves side by side: numpy's solver against the compiled one, same problems.

PMLE's and distillation's problems of ``distalign toy --preset paper`` (every n, fit, seed, β
and context, from both starts: 157,440 ten-response problems each), solved by
``fastnewton.solve`` (numpy) and ``cnewton.solve`` (tabular/fast/_newton.c), one thread and two,
in one process; prints the seconds, the ratio and the largest difference of the optima
(centred logits). Then PMLE's two-start solve without and with the one-start certificate.
Run: ``python benchmarks/toy_newton.py [--preset paper]``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from distalign.hostspeed import describe, host_speed
from distalign.tabular.config import ToyConfig
from distalign.tabular.fast import compiled as cnewton
from distalign.tabular.fast import engine as fast
from distalign.tabular.fast import newton as fastnewton


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    speed = host_speed()
    grid = fast.Grid(ToyConfig.from_preset(args.preset))
    print(f"preset {args.preset}; {os.cpu_count()} CPUs; 1-min load {load0:.2f}; "
          f"host {describe(speed)}")
    print(f"{'solves':<28}{'threads':>8}{'numpy s':>10}{'compiled s':>12}{'ratio':>8}"
          f"{'max |Δθ|':>11}")
    for method in ("pmle", "distill"):
        obj, theta0 = fast.problems(grid, method)
        for threads in (1, 2):
            t_np, (want, _) = timed(fastnewton.solve, obj, theta0, threads=threads)
            t_c, (got, _) = timed(cnewton.solve, obj, theta0, threads=threads)
            diff = np.abs((got - got.mean(0)) - (want - want.mean(0))).max()
            print(f"{method + ', both starts':<28}{threads:>8}{t_np:>10.2f}{t_c:>12.2f}"
                  f"{t_np / t_c:>8.2f}{diff:>11.1e}")
    for certify in (False, True):
        t, _ = timed(fast._two_starts, grid, "pmle", certify=certify)
        print(f"PMLE two_starts (compiled, 2 threads), certificate {certify}: {t:.2f} s")


if __name__ == "__main__":
    main()
