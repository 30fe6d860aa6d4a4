"""``distalign synthetic``: train every method through the ordinary engine in the known world.

Layout of the output directory ``out``::

    world.json            the world (deterministic in its config)
    pi0/                  the SFT run that made π₀ (π₀ = pi0/final); light_init/ (light R̂ start)
    data/n{n}-s{seed}/    pairs.jsonl (D_n), prompts.jsonl (its prompts), val.jsonl
    runs/n{n}-s{seed}/    offline runs, and the standard variant's reward/ and on-policy runs
    runs/n{n}-s{seed}/light/   the light variant's reward/ and on-policy runs
    synthetic_results.json, synthetic_table.md, claims.md, synthetic_kl.png, ...

Order: π₀ by SFT (once); then per (n, seed) the reward models and the offline methods; each
on-policy run starts as soon as its cell's reward model is done. Runs are independent engine
calls (``load_config`` + ``train``) scheduled by the pipeline runner over ``workers`` processes
with one torch thread each. Then up to ``1 + max(max_raises, max_extensions)`` rounds: after
each, ``adapt`` raises the step budget of on-policy runs that did not converge and extends
grids whose selected point is on an edge; finished runs are reused, new ones trained.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from distalign.pipeline.runner import Outcome, run_stages
from distalign.pipeline.runner import Stage as RunStage
from distalign.synthetic import adapt
from distalign.synthetic.adapt import adapt_plan, current
from distalign.synthetic.adapt import tag as _tag
from distalign.synthetic.config import ONLINE, Stage, SyntheticConfig
from distalign.synthetic.labels import (
    PairSet,
    pair_records,
    prompt_records,
    sample_pairs,
    sft_records,
    write_jsonl,
)
from distalign.synthetic.light import save_light_init
from distalign.synthetic.lm import save_policy, world_policy, world_tokenizer
from distalign.synthetic.metrics import (
    ExactEvaluator,
    ExactMetricsCallback,
    exact_metrics,
    fixed_point,
    rlhf_floor,
)
from distalign.synthetic.world import World, WorldConfig, build_world

Log = Callable[[str], None]


def _quiet(threads: int | None = None) -> None:
    """Silence per-run progress bars (hundreds of runs) and pin torch threads."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)


def _stage_run(stage: Stage, n: int, level: int, factor: int) -> dict[str, Any]:
    """The stage's run settings for data size n: the batch grows with n past
    ``batches_per_epoch`` steps per epoch; a raised budget multiplies ``max_steps``."""
    run = dict(stage.run)
    for at, epochs in sorted(stage.epochs_at.items()):
        if n >= at and "epochs" in run:
            run["epochs"] = epochs
    if stage.batches_per_epoch and "epochs" in run:
        run["batch_size"] = max(int(run["batch_size"]), math.ceil(n / stage.batches_per_epoch))
    if "max_steps" in run:
        run["max_steps"] = int(run["max_steps"]) * factor**level
    return run


def _engine_config(cfg: SyntheticConfig, stage_run: dict, stage: Stage, **sections: Any):
    """A config dict for ``load_config``: the world's generation and length settings, the
    stage's run/optim settings, then the per-run sections (model, data, run, algo)."""
    L = cfg.world.max_len
    run = {"progress": False, "resume": False, "log_every": 10, **stage_run, **sections["run"]}
    return {
        "model": sections["model"],
        "data": {"path": sections["data"], "max_prompt_length": 8, "max_length": 16},
        # T = 1, no truncation: the exact metrics score π itself, the distribution sampled
        "gen": {"temperature": 1.0, "max_new_tokens": L + 1, "top_k": 0, "top_p": 1.0},
        "run": run,
        "optim": dict(stage.optim),
        "algo": sections.get("algo", {}),
    }


def _eval_every(run: dict[str, Any], n: int, points: int, log_every: int = 10) -> int:
    """Evaluation period giving about ``points`` evaluations, rounded to a multiple of
    ``log_every``: the engine writes an evaluation into metrics.jsonl only on a logged step."""
    if "max_steps" in run:
        steps = int(run["max_steps"])
    else:
        steps = math.ceil(float(run.get("epochs", 1)) * n / int(run["batch_size"]))
    every = max(1, steps // max(points, 1))
    return max(log_every, round(every / log_every) * log_every)


# ------------------------------------------------------------------------------- workers
_CACHE: dict[str, Any] = {}


def _evaluator(world_cfg: dict, pi0: str, logp_ref: list | None) -> ExactEvaluator:
    key = json.dumps([world_cfg, pi0, logp_ref is not None])
    if key not in _CACHE:
        from transformers import AutoTokenizer

        world = build_world(WorldConfig(**world_cfg))
        ref = torch.tensor(logp_ref, dtype=torch.float64) if logp_ref is not None else None
        _CACHE[key] = ExactEvaluator(world, AutoTokenizer.from_pretrained(pi0), ref)
    return _CACHE[key]


def _target(ev: ExactEvaluator, job: dict[str, Any]) -> torch.Tensor | None:
    """ln π_T of an on-policy run: its fixed point under its own (frozen) reward model."""
    rm = job["config"]["model"].get("reward_model")
    if job["method"] not in ONLINE or not rm:
        return None
    from transformers import AutoModelForSequenceClassification

    from distalign.lm.models import register_model_type

    register_model_type(rm)  # a light reward model's type
    table = ev.reward_scores(AutoModelForSequenceClassification.from_pretrained(rm))
    return fixed_point(job["method"], job["params"], table, ev.logp_ref, ev.world.gamma)


def _convergence(job: dict[str, Any], curve: list[float]) -> dict[str, Any]:
    conv = job["convergence"]
    return {"converged": adapt.converged(curve, conv["window"], conv["tol"]),
            "obj_curve": curve}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One engine run with the exact-metrics callback; reuses a finished run directory."""
    from distalign.train import load_config, train

    run_dir = Path(job["config"]["run"]["output_dir"]) / job["config"]["run"]["name"]
    record = {k: job[k] for k in ("method", "variant", "n", "seed", "tag", "params", "level")}
    record["run_dir"] = str(run_dir)
    summary = run_dir / "summary.json"
    steps = job["config"]["run"].get("max_steps")
    done = summary.exists() and not job.get("overwrite") and (
        steps is None or json.loads(summary.read_text()).get("step", 0) >= steps)
    if done:
        metrics = json.loads(summary.read_text())["metrics"]
        record.update(metrics=_synthetic(metrics), seconds=0.0, reused=True)
    else:
        _quiet(job.get("threads"))
        ev = _evaluator(job["world"], job["pi0"], job["logp_ref"])
        val = PairSet(*(torch.tensor(job["val"][k]) for k in ("x", "chosen", "rejected")))
        callback = ExactMetricsCallback(ev, val, target=_target(ev, job))
        t0 = time.perf_counter()
        train(load_config(job["method"], job["config"]), callbacks=[callback])
        last = {k: v for k, v in callback.history[-1].items() if k != "step"}
        record.update(metrics=_synthetic(last), seconds=time.perf_counter() - t0, reused=False)
    if job["method"] in ONLINE:  # the whole curve, across a continued run's two parts
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        record.update(_convergence(job, [r["synthetic/obj_gap"] for r in rows
                                         if "synthetic/obj_gap" in r]))
    return record


def _synthetic(metrics: dict[str, Any]) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("synthetic/")}


# ------------------------------------------------------------------------------- setup
def prepare_world(cfg: SyntheticConfig, out: Path, log: Log = print) -> dict[str, Any]:
    """Build the world, fine-tune π₀ on π_sft samples (reused if done), score π₀ exactly."""
    world = build_world(cfg.world)
    world.save(out / "world.json")
    tok = world_tokenizer(world)
    init = save_policy(world_policy(tok, seed=cfg.world.seed), tok, out / "pi0_init")
    light = save_light_init(world, tok, out / "light_init")
    data = write_jsonl(
        out / "data" / "sft.jsonl",
        sft_records(world, world.logp_sft(), cfg.sft_samples, cfg.world.seed),
    )
    pi0 = out / "pi0" / "final"
    if not (out / "pi0" / "summary.json").exists():
        from distalign.train import load_config, train

        log(f"π₀: SFT on {cfg.sft_samples} samples of π_sft")
        econf = _engine_config(
            cfg, _stage_run(cfg.sft, cfg.sft_samples, 0, 1), cfg.sft,
            model={"name_or_path": str(init)}, data=str(data),
            run={"name": "pi0", "output_dir": str(out), "seed": cfg.world.seed},
        )
        callback = ExactMetricsCallback(ExactEvaluator(world, tok, world.logp_sft()))
        train(load_config("sft", econf), callbacks=[callback])
    from transformers import AutoModelForCausalLM

    ev = ExactEvaluator(world, tok)
    logp_ref = ev.policy_logprobs(AutoModelForCausalLM.from_pretrained(pi0))
    ls = world.logp_star()
    return {
        "world": world,
        "pi0": str(pi0),
        "light_init": str(light),
        "logp_ref": logp_ref,
        "reference": {
            "pi0": exact_metrics(logp_ref, ls, world.gamma, logp_ref),
            "pi_sft": exact_metrics(world.logp_sft(), ls, world.gamma, logp_ref),
            "rlhf_floor_true_reward": rlhf_floor(logp_ref, ls, world.gamma),
            "entropy_star": -(ls.exp() * ls).sum(-1).mean().item(),
        },
    }


def _cell_data(cfg: SyntheticConfig, world: World, logp_ref: torch.Tensor, out: Path, seed: int):
    """Nested data for one seed: D_n is the first n of one draw, so sizes share their pairs."""
    n_max = max(cfg.sizes)
    train_pairs = sample_pairs(world, logp_ref, n_max, seed=10_000 + seed)
    val_pairs = sample_pairs(world, logp_ref, math.ceil(n_max * cfg.val_fraction), 20_000 + seed)
    cells = {}
    for n in cfg.sizes:
        d = out / "data" / f"n{n}-s{seed}"
        tr, va = train_pairs.subset(n), val_pairs.subset(math.ceil(n * cfg.val_fraction))
        write_jsonl(d / "pairs.jsonl", pair_records(world, tr))
        write_jsonl(d / "prompts.jsonl", prompt_records(world, tr))
        write_jsonl(d / "val.jsonl", pair_records(world, va))
        val = {"x": va.x.tolist(), "chosen": va.chosen.tolist(), "rejected": va.rejected.tolist()}
        cells[(n, seed)] = {"dir": d, "val": val}
    return cells


def _cell_dir(out: Path, n: int, seed: int, variant: str) -> Path:
    base = out / "runs" / f"n{n}-s{seed}"
    return base / "light" if variant == "light" else base


def _job(cfg, setup, cell, key, params, level, out, overwrite=False, threads=1):
    """The runner spec of one engine run; ``key`` = (variant, method, n, seed)."""
    variant, method, n, seed = key
    stage = (cfg.reward_stage(variant) if method == "reward"
             else cfg.online if method in ONLINE else cfg.offline)
    factor = cfg.convergence.raise_factor
    tag = "reward" if method == "reward" else f"{method}-{_tag(params)}"
    cdir = _cell_dir(out, n, seed, variant)
    if method == "reward":
        model = {"name_or_path": setup["light_init"] if variant == "light" else setup["pi0"]}
    else:
        model = {"name_or_path": setup["pi0"]}
    if method in ONLINE:
        model["reward_model"] = str(cdir / "reward" / "final")
    data = cell["dir"] / ("prompts.jsonl" if method in ONLINE else "pairs.jsonl")
    algo = {**stage.algo, **cfg.fixed_algo(method), **params}
    srun = _stage_run(stage, n, level, factor)
    run = {"name": tag, "output_dir": str(cdir), "seed": seed,
           "eval_every": _eval_every(srun, n, cfg.eval_points)}
    if method in ONLINE:  # a raised budget continues the run from its last checkpoint
        run.update(resume=True, save_every=int(stage.run["max_steps"]))
    econf = _engine_config(cfg, srun, stage, model=model, data=str(data), run=run, algo=algo)
    return {
        "method": method, "variant": variant, "n": n, "seed": seed, "tag": tag,
        "params": params, "level": level, "config": econf, "world": asdict(cfg.world),
        "pi0": setup["pi0"], "val": cell["val"], "logp_ref": setup["logp_ref"].tolist(),
        "overwrite": overwrite, "threads": threads, "convergence": asdict(cfg.convergence),
    }


def initial_plan(cfg: SyntheticConfig) -> dict[tuple, dict[str, Any]]:
    """Per (variant, method, n, seed): its grid points (params, budget level) and the
    extensions made. Offline methods do not use R̂: one group, variant "offline"."""
    plan = {}
    for n in cfg.sizes:
        for s in cfg.seeds:
            for m in cfg.methods:
                if m in ONLINE and n < cfg.online_min_n:
                    continue
                for v in (cfg.reward_classes if m in ONLINE else ("offline",)):
                    plan[(v, m, n, s)] = {"points": [[dict(p), 0] for p in cfg.grids[m]],
                                          "ext": {"low": 0, "high": 0}}
    return plan


def run_grid(
    cfg: SyntheticConfig, out: str | Path, overwrite: bool = False, log: Log = print
) -> dict[str, Any]:
    """Run the grid in adaptive rounds (at most 1 + raises + 2·extensions); returns (and
    writes) the results."""
    from distalign.synthetic.results import summarise, write_outputs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _quiet()
    setup = prepare_world(cfg, out, log)
    cells: dict[tuple[int, int], Any] = {}
    for seed in cfg.seeds:
        cells.update(_cell_data(cfg, setup["world"], setup["logp_ref"], out, seed))
    threads = 1 if cfg.workers > 1 else None
    plan, events = _load_plan(cfg, out / "plan.json")
    # every raise and every extension needs a round; the last round's runs are final
    rounds = 1 + cfg.convergence.max_raises + 2 * cfg.max_extensions
    for r in range(rounds):
        stages = _stages(cfg, setup, cells, plan, out, overwrite, threads)
        records = _execute(stages, cfg.workers, overwrite and r == 0, log)
        new = adapt_plan(cfg, plan, records) if r < rounds - 1 else []
        for e in new:
            e["round"] = r + 1
            log(f"after round {r + 1}: {e['what']} for {e['variant']} {e['method']} n={e['n']}"
                f" seed={e['seed']}: {e['detail']}")
        events += new
        _save_plan(cfg, out / "plan.json", plan, events)
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


def _stages(cfg, setup, cells, plan, out, overwrite, threads) -> list[RunStage]:
    def job(key, params, level=0):
        return _job(cfg, setup, cells[key[2:]], key, params, level, out, overwrite, threads)

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
            deps = (f"{_cell_name(v, n, s)}/reward",) if m in ONLINE else ()
            for params, level in group["points"]:
                stages.append(_stage(job((v, m, n, s), params, level), deps))
    return stages


def _cell_name(variant: str, n: int, seed: int) -> str:
    return f"n{n}-s{seed}" + ("/light" if variant == "light" else "")


def _stage(job: dict[str, Any], deps: tuple[str, ...] = ()) -> RunStage:
    run = job["config"]["run"]
    return RunStage(name=f"{_cell_name(job['variant'], job['n'], job['seed'])}/{job['tag']}",
                    kind="train", target="distalign.synthetic.experiment:run_job",
                    spec={"job": job}, out=Path(run["output_dir"]) / run["name"], deps=deps)


def _execute(stages: list[RunStage], workers: int, overwrite: bool, log: Log) -> list[dict]:
    """Run the grid's stages through the pipeline runner (one scheduler in the codebase)."""
    records: list[dict] = []
    fresh = [0]

    def done(outcome: Outcome) -> None:
        rec = dict(outcome.result)
        if outcome.reused:
            rec.update(seconds=0.0, reused=True)
        records.append(rec)
        if rec.get("reused"):
            return
        fresh[0] += 1
        m = rec["metrics"]
        kl = m.get("kl_fwd", m.get("rm_kl_fwd", float("nan")))
        conv = "" if "converged" not in rec else (
            ", converged" if rec["converged"] else ", NOT converged")
        log(f"[{len(records)}/{len(stages)}] {rec['variant']} n={rec['n']} seed={rec['seed']} "
            f"{rec['tag']}: KL(π*‖·)={kl:.4f} ({rec['seconds']:.0f}s{conv})")

    run_stages(stages, workers=workers, force=overwrite, log=lambda _: None, on_done=done)
    return records
