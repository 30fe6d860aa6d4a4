"""Wall-clock time of ``distalign synthetic`` (quick and default grids) on this machine.

Targets (issue): default grid ≤ 30 min on 2 CPU cores, ``--quick`` ≤ 3 min.

The grids (``distalign/synthetic/config.py``):

- default: 6 methods (pmle, dpo, distill, rebel, rlhf, rkl) × n ∈ {1024, 4096, 16384} × seeds
  {0, 1} × 3 grid points = 108 policy runs, plus 6 reward models and the SFT of π₀:
  115 engine runs. Offline runs: 5 epochs; reward model: 10 epochs; on-policy: 150 steps of
  64 prompts. 2 worker processes, 1 torch thread each.
- quick: n ∈ {512, 2048}, 1 seed, 1–2 grid points per method, short training: 17 engine runs.

Measured (2-core x86 VM, torch 2.13 CPU; other jobs were sharing the machine, so these are
upper bounds — the load average is printed with every measurement):

- quick:   see MEASURED below
- default: see MEASURED below

Usage: ``python benchmarks/synthetic_speed.py [--grid quick|default|both] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

# Filled in from runs of this script (seconds, load average 1-min at start and end).
MEASURED = {
    "quick": {"seconds": None, "load": None},
    "default": {"seconds": None, "load": None},
}
LIMITS = {"quick": 180.0, "default": 1800.0}


def measure(grid: str, out: Path) -> dict:
    from distalign.synthetic.config import default_config, quick_config
    from distalign.synthetic.experiment import run_grid

    if out.exists():
        shutil.rmtree(out)  # a timing must not reuse finished runs
    cfg = (quick_config if grid == "quick" else default_config)()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = run_grid(cfg, out, log=lambda s: None)
    seconds = time.perf_counter() - t0
    return {
        "grid": grid,
        "seconds": round(seconds, 1),
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
