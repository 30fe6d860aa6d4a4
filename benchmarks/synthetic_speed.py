"""Wall-clock time of ``distalign synthetic`` (quick and default grids), and an estimate of a
grid's CPU time from its size.

Targets (issue 8): the default grid ≤ 30 min on the idle 2-core machine, ``--quick`` ≤ 3 min.

The grids (``distalign/synthetic/config.py``, version 2):

- default: 6 methods × 2 reward classes × n ∈ {1024, 4096, 16384, 65536} × seeds {0, 1, 2}.
  Offline (pmle 3 β, dpo 3 γ_DPO; shared by both classes) with epochs 3/3/2/1; 2 reward models
  per cell from n = 4096 on; on-policy from n = 4096: distill, rkl and rebel with 2 β each,
  rlhf with 3, 64 steps of 256 prompts per run, plus β-grid extensions and continuations to
  128 steps where a run has not converged. 2 worker processes, 1 torch thread each.
- quick: n ∈ {512, 2048}, 1 seed, 1–2 grid points, 40 on-policy steps, no adaptation: 26
  engine runs plus the SFT of π₀.

Measured on the project's 2-core VM while a real-model pipeline used both cores (1-min load
average 3–5), so wall times are upper bounds and CPU time (user + sys of the whole process tree)
is the better guide to the idle machine:

- quick (version 2, both reward classes): 84 s wall, 64 s CPU (load ≈ 3.5); 182 s wall,
  69 s CPU with a second grid running beside it. Target: 180 s idle.
- ``distalign synthetic --sizes 1024,4096 --seeds 0`` (an earlier sizing: 100 on-policy steps,
  on-policy runs also at n = 1024): 69 engine runs in 2 rounds (10 continuations, 13 grid
  extensions), 1773 s wall, 1137 s CPU, at a load of ≈ 5.
- default (version 2): not measured here (the lead measures it idle). ``--estimate`` prints
  the CPU seconds that the per-unit costs below predict; wall ≈ CPU / 2 with 2 workers plus
  the tail of the last round.

Per-unit CPU costs (seconds, measured under the same load with ``torch`` on 1 thread):
offline 0.45 ms per pair per epoch (pmle and dpo, any batch ≥ 256: the tiny model costs per
example); standard reward model 0.27 ms per pair per epoch; light reward model 0.03 s per
step; on-policy 0.14 s per step at 256 prompts × 2 passes (0.17 with the standard R̂ and
transformer value model, 0.11 with the light ones); ≈ 0.5 s start-up per engine run
(worker processes import once).

Usage: ``python benchmarks/synthetic_speed.py [--grid quick|default|both] [--out DIR]``
or ``python benchmarks/synthetic_speed.py --estimate [--raised 0.5]``.
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
    "quick": {"wall_s": 84, "cpu_s": 64, "load": 3.5},
    "sizes 1024,4096 seed 0": {"wall_s": 1773, "cpu_s": 1137, "load": 5.0},
}
LIMITS = {"quick": 180.0, "default": 1800.0}
# The per-unit costs miss the main process's own work (data, π₀'s evaluation, outputs) and
# the extension rounds: on the grid ``--sizes 1024,4096 --seeds 0`` (69 engine runs, 2 rounds)
# they predicted ≈ 910 CPU-s against 1137 measured, hence this factor.
CALIBRATION = 1.25
COST = {"offline_pair": 0.45e-3, "reward_pair": 0.27e-3, "light_step": 0.03,
        "online_step": 0.14, "startup": 0.5, "sft": 25.0}


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def estimate(grid: str, raised: float) -> dict:
    """CPU seconds the grid's size predicts, before and after its adaptive rounds (assuming a
    fraction ``raised`` of on-policy runs is continued once, and one extension per group
    whose starting grid has an extendable edge is not counted: it is reported separately)."""
    from distalign.synthetic.config import ONLINE, default_config, quick_config
    from distalign.synthetic.experiment import _stage_run

    cfg = (quick_config if grid == "quick" else default_config)()
    parts = {"sft": COST["sft"], "offline": 0.0, "reward": 0.0, "online": 0.0}
    runs = 0
    cells = [(n, s) for n in cfg.sizes for s in cfg.seeds]
    for n, _ in cells:
        for m in cfg.methods:
            if m in ONLINE and n < cfg.online_min_n:
                continue
            if m in ONLINE:
                k = len(cfg.grids[m]) * len(cfg.reward_classes)
                steps = _stage_run(cfg.online, n, 0, 1)["max_steps"]
                parts["online"] += k * (steps * COST["online_step"] + COST["startup"])
            else:
                k = len(cfg.grids[m])
                epochs = float(_stage_run(cfg.offline, n, 0, 1)["epochs"])
                parts["offline"] += k * (n * epochs * COST["offline_pair"] + COST["startup"])
            runs += k
        for v in (cfg.reward_classes if n >= cfg.online_min_n else ()):
            run = _stage_run(cfg.reward_stage(v), n, 0, 1)
            pairs = n * float(run["epochs"])
            parts["reward"] += COST["startup"] + (
                pairs / run["batch_size"] * COST["light_step"] if v == "light"
                else pairs * COST["reward_pair"])
            runs += 1
    extra = raised * parts["online"] * (cfg.convergence.raise_factor - 1)
    base = sum(parts.values())
    total = (base + extra) * CALIBRATION
    return {"grid": grid, "engine_runs_first_round": runs + 1,
            "cpu_s_by_part": {k: round(v) for k, v in parts.items()},
            "cpu_s_first_round": round(base), "cpu_s_with_raises": round(base + extra),
            "cpu_s_calibrated": round(total), "wall_min_2_workers": round(total / 2 / 60, 1)}


def measure(grid: str, out: Path) -> dict:
    from distalign.pipeline.synthetic_grid import run_grid
    from distalign.synthetic.config import default_config, quick_config

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
        "grid_events": len(results["events"]),
        "not_converged": results["convergence"]["not_converged"],
        "cpu_count": os.cpu_count(),
        "load_avg_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=("quick", "default", "both"), default="quick")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: temp)")
    parser.add_argument("--estimate", action="store_true",
                        help="print the CPU time the grid's size predicts; train nothing")
    parser.add_argument("--raised", type=float, default=0.5,
                        help="with --estimate: fraction of on-policy runs continued once")
    args = parser.parse_args()
    grids = ("quick", "default") if args.grid == "both" else (args.grid,)
    if args.estimate:
        for grid in grids:
            print(json.dumps(estimate(grid, args.raised)), flush=True)
        return
    base = args.out or Path(tempfile.mkdtemp(prefix="synthetic_speed_"))
    for grid in grids:
        print(json.dumps(measure(grid, base / grid)), flush=True)


if __name__ == "__main__":
    main()
