"""Wall-clock time of ``distalign synthetic`` (quick and default grids) on this machine.

Targets (issue): default grid ≤ 30 min on 2 CPU cores, ``--quick`` ≤ 3 min.

The grids (``distalign/synthetic/config.py``):

- default: 6 methods (pmle, dpo, distill, rebel, rlhf, rkl) × n ∈ {1024, 4096, 16384} × seeds
  {0, 1} × 3 grid points = 108 policy runs, plus 6 reward models and the SFT of π₀:
  115 engine runs. Offline runs: 5 epochs; reward model: 10 epochs; on-policy: 150 steps of
  64 prompts. 2 worker processes, 1 torch thread each.
- quick: n ∈ {512, 2048}, 1 seed, 1–2 grid points per method, short training: 17 engine runs.

Measured on the project's 2-core x86 VM (torch 2.13 CPU). Other jobs shared the VM during
every measurement (1-min load average 2.5–5 on 2 cores), so wall times are upper bounds; the
CPU time of the whole process tree is the better guide to a dedicated 2-core machine:

- default: 29 min 50 s wall (load ≈ 4–5), 1785 s CPU in total → ≈ 15 min on 2 free cores.
  Within the 30-minute target even on the shared machine, but only just.
- quick:   123 s wall (load ≈ 4), 120 s CPU → ≈ 1 min on 2 free cores (target: 3 min).

Usage: ``python benchmarks/synthetic_speed.py [--grid quick|default|both] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

# Measured wall seconds, CPU seconds and 1-min load average (see the module docstring).
MEASURED = {
    "quick": {"wall_s": 123, "cpu_s": 120, "load": 4.0},
    "default": {"wall_s": 1790, "cpu_s": 1785, "load": 4.5},
}
LIMITS = {"quick": 180.0, "default": 1800.0}


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def measure(grid: str, out: Path) -> dict:
    from distalign.synthetic.config import default_config, quick_config
    from distalign.synthetic.experiment import run_grid

    if out.exists():
        shutil.rmtree(out)  # a timing must not reuse finished runs
    cfg = (quick_config if grid == "quick" else default_config)()
    load0 = os.getloadavg()[0]
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    results = run_grid(cfg, out, log=lambda s: None)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    return {
        "grid": grid,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),  # this process + its (reaped) worker processes
        "limit_seconds": LIMITS[grid],
        "within_limit": seconds <= LIMITS[grid],
        "engine_runs": len(results["runs"]) + 1,  # + the SFT of π₀
        "cpu_count": os.cpu_count(),
        "load_avg_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=("quick", "default", "both"), default="quick")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: temp)")
    args = parser.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="synthetic_speed_"))
    grids = ("quick", "default") if args.grid == "both" else (args.grid,)
    for grid in grids:
        print(json.dumps(measure(grid, base / grid)), flush=True)


if __name__ == "__main__":
    main()
