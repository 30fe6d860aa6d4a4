"""Wall time of ``distalign toy --preset paper`` from the shell, and where it goes.

The command is run as a user runs it: a fresh ``python -m distalign toy`` process (start-up and
imports included) writing its JSON, CSV and figure into a temporary folder. Target (issue 8):
≤ 3 s wall on an idle 2-core machine for six methods, 8 seeds, n = 2⁵…2¹⁶ and 41 β values.

The split comes from the ``timings`` the run records in results.json: Newton solves (PMLE,
distillation, DPO, REBEL and the BT reward, with the world and data), closed forms (RLHF, RKL),
β selection (exact KL metrics, oracle and honest choices, records), I/O and plot; start-up is
the wall time left over (interpreter, imports of numpy, typer, rich and the CLI, and printing
the tables; on the CPU the toy does not import torch). With more than one thread (the
default) the Newton solves of PMLE and distillation share their problems among the threads.
Run: ``python benchmarks/toy_speed.py [--repeat 3] [--threads 1]``. CPU time is the child's
user + sys; on a shared machine compare it rather than wall time, and note the load average
and the host's speed (``distalign.hostspeed``): the same code took 6.3 s on one day and
9.7 s on another on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distalign.hostspeed import describe, host_speed

PHASES = ("newton", "closed_forms", "selection", "io_plot")


def run_once(preset: str, threads: int | None, extra: list[str]) -> dict[str, float]:
    """One ``distalign toy`` process: wall, child CPU and the recorded phase timings."""
    with tempfile.TemporaryDirectory() as tmp:
        flag = [] if threads is None else ["--threads", str(threads)]
        cmd = [sys.executable, "-m", "distalign", "toy", "--preset", preset, *flag,
               "--out", tmp, *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, check=False)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.exit(f"distalign toy failed ({proc.returncode}): {proc.stderr.strip()}")
        data = json.loads((Path(tmp) / "results.json").read_text())
    out = {"wall": wall, "cpu": (after.ru_utime - before.ru_utime)
           + (after.ru_stime - before.ru_stime)}
    out.update({k: float(data["timings"].get(k, 0.0)) for k in PHASES})
    out["startup"] = wall - sum(out[k] for k in PHASES)
    oracle = [r for r in data["summary"]
              if r["n"] == max(data["config"]["ns"]) and r["choice"] == "oracle"]
    out["fkl"] = {r["method"]: r["fkl"] for r in oracle}  # type: ignore[assignment]
    out["solver"] = data.get("solver", "?")  # type: ignore[assignment]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs (the fastest is shown)")
    parser.add_argument("--preset", default="paper", help="paper or strong")
    parser.add_argument("--threads", type=int, default=None,
                        help="methods solved at once (default: the command's own default)")
    parser.add_argument("extra", nargs="*", help="more `distalign toy` flags (after --)")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    speed = host_speed()  # before the runs, so that it does not run beside one
    runs = [run_once(args.preset, args.threads, args.extra) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["wall"])
    walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
    threads = "default" if args.threads is None else args.threads
    print(f"distalign toy --preset {args.preset}, threads {threads}: 6 methods, 8 seeds, "
          f"n = 2^5..2^16, 41 β values; {os.cpu_count()} CPUs; 1-min load average "
          f"{load0:.2f} before, {os.getloadavg()[0]:.2f} after; host {describe(speed)}")
    print(f"wall from the shell: best {best['wall']:.2f} s of {len(runs)} "
          f"({walls}); CPU (user+sys) of that run "
          f"{best['cpu']:.2f} s; target 3 s")
    names = {"startup": "start-up and imports (+ tables)", "newton": "Newton solves",
             "closed_forms": "closed forms", "selection": "β selection and metrics",
             "io_plot": "I/O and plot"}
    for key in ("startup", "newton", "closed_forms", "selection", "io_plot"):
        print(f"  {names[key]:<34} {best[key]:6.2f} s")
    print(f"Newton solver: {best['solver']} (tabular/fast/_newton.c when built, else numpy)")
    print("forward KL at n = 2^16 (oracle β): "
          + ", ".join(f"{m} {v:.3g}" for m, v in best["fkl"].items()))  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
