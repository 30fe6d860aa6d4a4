"""``distalign synthetic``'s grid as a pipeline plan: every engine run a stage of the runner.

Order: π₀ by SFT (once); then per (n, seed) the reward models and the offline methods; each
on-policy run starts as soon as its cell's reward model is done. Runs are independent engine
calls (``distalign.synthetic.experiment.run_job``) scheduled by the pipeline runner over
``workers`` processes with one torch thread each. Then up to ``1 + max_raises +
2·max_extensions`` rounds: after each, ``adapt`` raises the step budget of on-policy runs that
did not converge and extends grids whose selected point is on an edge; finished runs are
reused, new ones trained. The world, its data and each run live in ``distalign.synthetic``;
this module only plans and schedules (it sits above both the worlds and the runner).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from distalign.pipeline.runner import Outcome, Stage, run_stages
from distalign.synthetic.adapt import adapt_plan, current
from distalign.synthetic.config import ONLINE, SyntheticConfig
from distalign.synthetic.experiment import (
    cell_data,
    cell_name,
    initial_plan,
    make_job,
    prepare_world,
    quiet,
)
from distalign.synthetic.results import summarise, write_outputs

Log = Callable[[str], None]
PLAN = "plan.json"


def run_grid(
    cfg: SyntheticConfig, out: str | Path, overwrite: bool = False, log: Log = print
) -> dict[str, Any]:
    """Run the grid in adaptive rounds (at most 1 + raises + 2·extensions); returns (and
    writes) the results. ``overwrite`` retrains from the initial grid."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    quiet()
    setup = prepare_world(cfg, out, log)
    cells: dict[tuple[int, int], Any] = {}
    for seed in cfg.seeds:
        cells.update(cell_data(cfg, setup["world"], setup["logp_ref"], out, seed))
    threads = 1 if cfg.workers > 1 else None
    plan, events = (initial_plan(cfg), []) if overwrite else _load_plan(cfg, out / PLAN)
    # every raise and every extension needs a round; the last round's runs are final
    rounds = 1 + cfg.convergence.max_raises + 2 * cfg.max_extensions
    records: list[dict] = []
    for r in range(rounds):
        # overwrite in the first round only: later rounds continue (raised budgets) or
        # reuse what that round retrained
        fresh = overwrite and r == 0
        records = _execute(_stages(cfg, setup, cells, plan, out, fresh, threads), cfg.workers,
                           fresh, log)
        new = adapt_plan(cfg, plan, records) if r < rounds - 1 else []
        for e in new:
            e["round"] = r + 1
            log(f"after round {r + 1}: {e['what']} for {e['variant']} {e['method']} n={e['n']}"
                f" seed={e['seed']}: {e['detail']}")
        events += new
        _save_plan(cfg, out / PLAN, plan, events)
        if not new:
            break
    results = summarise(cfg, setup, current(plan, records), events, records,
                        time.perf_counter() - t_start)
    write_outputs(results, out)
    log(f"elapsed: {results['seconds']:.0f} s wall for {len(records)} engine runs")
    return results


def _fingerprint(cfg: SyntheticConfig) -> str:
    return json.dumps({k: v for k, v in asdict(cfg).items() if k != "workers"}, sort_keys=True,
                      default=str)


def _load_plan(cfg: SyntheticConfig, path: Path) -> tuple[dict, list[dict]]:
    """The adapted grid of an earlier call with the same config (so a rerun reuses its runs
    instead of re-deciding from longer-trained ones), else the initial grid."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config") == _fingerprint(cfg):
            return {tuple(k): g for k, g in saved["plan"]}, saved["events"]
    return initial_plan(cfg), []


def _save_plan(cfg: SyntheticConfig, path: Path, plan: dict, events: list[dict]) -> None:
    data = {"config": _fingerprint(cfg), "plan": [[list(k), g] for k, g in plan.items()],
            "events": events}
    path.write_text(json.dumps(data, indent=1) + "\n")


def _stages(cfg: SyntheticConfig, setup: dict[str, Any], cells: dict, plan: dict, out: Path,
            overwrite: bool, threads: int | None) -> list[Stage]:
    def job(key: tuple, params: dict, level: int = 0) -> dict[str, Any]:
        return make_job(cfg, setup, cells[key[2:]], key, params, level, out, overwrite, threads)

    # biggest cells first: their runs are the longest, so they should not start last
    order = sorted(cells, key=lambda c: (-c[0], c[1]))
    needs_rm = any(m in ONLINE for m in cfg.methods)
    stages = [_stage(job((v, "reward", n, s), {})) for n, s in order
              if needs_rm and n >= cfg.online_min_n
              for v in cfg.reward_classes]
    for n, s in order:
        for (v, m, gn, gs), group in plan.items():
            if (gn, gs) != (n, s):
                continue
            deps = (f"{cell_name(v, n, s)}/reward",) if m in ONLINE else ()
            for params, level in group["points"]:
                stages.append(_stage(job((v, m, n, s), params, level), deps))
    return stages


def _stage(job: dict[str, Any], deps: tuple[str, ...] = ()) -> Stage:
    run = job["config"]["run"]
    return Stage(name=f"{cell_name(job['variant'], job['n'], job['seed'])}/{job['tag']}",
                 kind="train", target="distalign.synthetic.experiment:run_job",
                 spec={"job": job}, out=Path(run["output_dir"]) / run["name"], deps=deps)


def _execute(stages: list[Stage], workers: int, overwrite: bool, log: Log) -> list[dict]:
    """Run the grid's stages through the pipeline runner (one scheduler in the codebase)."""
    records: list[dict] = []

    def done(outcome: Outcome) -> None:
        rec = dict(outcome.result)
        if outcome.reused:
            rec.update(seconds=0.0, reused=True)
        records.append(rec)
        if rec.get("reused"):
            return
        m = rec["metrics"]
        kl = m.get("kl_fwd", m.get("rm_kl_fwd", float("nan")))
        conv = "" if "converged" not in rec else (
            ", converged" if rec["converged"] else ", NOT converged")
        log(f"[{len(records)}/{len(stages)}] {rec['variant']} n={rec['n']} seed={rec['seed']} "
            f"{rec['tag']}: KL(π*‖·)={kl:.4f} ({rec['seconds']:.0f}s{conv})")

    run_stages(stages, workers=workers, force=overwrite, log=lambda _: None, on_done=done)
    return records
