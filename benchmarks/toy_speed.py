"""Wall time of the full `paper` toy preset: six methods, 8 seeds, 12 sample sizes, 41 β values.

Target: under 10 s on a 2-core CPU. Run: ``python benchmarks/toy_speed.py [--repeat 3]``.
The load average is printed because a busy machine inflates the number.
"""

from __future__ import annotations

import argparse
import os
import time

from distalign.tabular import ToyConfig, run_toy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs (best is reported)")
    parser.add_argument("--preset", default="paper", help="paper or strong")
    args = parser.parse_args()
    cfg = ToyConfig.from_preset(args.preset)
    walls, cpus = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_toy(cfg)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"toy preset '{args.preset}': {len(cfg.methods)} methods, {cfg.seeds} seeds, "
          f"{len(cfg.ns)} sizes n, {len(cfg.betas)} β values, torch threads during the run "
          f"{cfg.threads} (ToyConfig.threads), CPUs {os.cpu_count()}")
    print(f"wall time: best {min(walls):.2f} s over {len(walls)} run(s) "
          f"(all: {', '.join(f'{w:.2f}' for w in walls)}); process CPU time "
          f"{min(cpus):.2f} s; 1-min load average {load:.2f}")
    rl = [r for r in res.summary if r["n"] == max(cfg.ns) and r["choice"] == "oracle"]
    print("forward KL at n_max (oracle β): "
          + ", ".join(f"{r['method']} {r['fkl']:.3g}" for r in rl))


if __name__ == "__main__":
    main()
