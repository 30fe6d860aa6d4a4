"""``distalign synthetic``: train every method through the ordinary engine in the known world.

Layout of the output directory ``out``::

    world.json            the world (deterministic in its config)
    pi0/                  the SFT run that made π₀ (π₀ = pi0/final)
    data/n{n}-s{seed}/    pairs.jsonl (D_n), prompts.jsonl (its prompts), val.jsonl
    runs/n{n}-s{seed}/    one engine run directory per method × grid point, plus reward/
    synthetic_results.json, synthetic_table.md, synthetic_kl.png, synthetic_winrate.png

Order: π₀ by SFT (once); then per (n, seed) the reward model and the offline methods; each
on-policy method starts as soon as its cell's reward model is done. Runs are independent
engine calls (``load_config`` + ``train``), spread over ``workers`` processes with one torch
thread each (tiny models parallelise far better across processes than inside one).
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
from distalign.synthetic.config import ONLINE, Stage, SyntheticConfig
from distalign.synthetic.labels import (
    PairSet,
    pair_records,
    prompt_records,
    sample_pairs,
    sft_records,
    write_jsonl,
)
from distalign.synthetic.lm import save_policy, world_policy, world_tokenizer
from distalign.synthetic.metrics import (
    ExactEvaluator,
    ExactMetricsCallback,
    exact_metrics,
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


def _tag(params: dict[str, float]) -> str:
    return "-".join(f"{k}{v:g}" for k, v in sorted(params.items())) or "default"


def _engine_config(cfg: SyntheticConfig, stage: Stage, **sections: Any) -> dict[str, Any]:
    """A config dict for ``load_config``: the world's generation and length settings, the
    stage's run/optim settings, then the per-run sections (model, data, run, algo)."""
    L = cfg.world.max_len
    run = {"progress": False, "resume": False, "log_every": 10, **stage.run, **sections["run"]}
    return {
        "model": sections["model"],
        "data": {"path": sections["data"], "max_prompt_length": 8, "max_length": 16},
        # T = 1, no truncation: the exact metrics score π itself, the distribution sampled
        "gen": {"temperature": 1.0, "max_new_tokens": L + 1, "top_k": 0, "top_p": 1.0},
        "run": run,
        "optim": dict(stage.optim),
        "algo": sections.get("algo", {}),
    }


def _eval_every(stage: Stage, n: int, points: int, log_every: int = 10) -> int:
    """Evaluation period giving about ``points`` evaluations, rounded to a multiple of
    ``log_every``: the engine writes an evaluation into metrics.jsonl only on a logged step."""
    if "max_steps" in stage.run:
        steps = int(stage.run["max_steps"])
    else:
        steps = math.ceil(float(stage.run.get("epochs", 1)) * n / int(stage.run["batch_size"]))
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


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One engine run with the exact-metrics callback; reuses a finished run directory."""
    from distalign.train import load_config, train

    run_dir = Path(job["config"]["run"]["output_dir"]) / job["config"]["run"]["name"]
    record = {k: job[k] for k in ("method", "n", "seed", "tag", "params")}
    record["run_dir"] = str(run_dir)
    summary = run_dir / "summary.json"
    if summary.exists() and not job.get("overwrite"):
        metrics = json.loads(summary.read_text())["metrics"]
        record.update(metrics=_synthetic(metrics), seconds=0.0, reused=True)
        return record
    _quiet(job.get("threads"))
    ev = _evaluator(job["world"], job["pi0"], job["logp_ref"])
    val = PairSet(*(torch.tensor(job["val"][k]) for k in ("x", "chosen", "rejected")))
    callback = ExactMetricsCallback(ev, val)
    t0 = time.perf_counter()
    train(load_config(job["method"], job["config"]), callbacks=[callback])
    last = {k: v for k, v in callback.history[-1].items() if k != "step"}
    record.update(metrics=_synthetic(last), seconds=time.perf_counter() - t0, reused=False)
    record["curve"] = callback.history
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
    data = write_jsonl(
        out / "data" / "sft.jsonl",
        sft_records(world, world.logp_sft(), cfg.sft_samples, cfg.world.seed),
    )
    pi0 = out / "pi0" / "final"
    if not (out / "pi0" / "summary.json").exists():
        from distalign.train import load_config, train

        log(f"π₀: SFT on {cfg.sft_samples} samples of π_sft")
        econf = _engine_config(
            cfg, cfg.sft, model={"name_or_path": str(init)}, data=str(data),
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


def _job(cfg, setup, cell, method, n, seed, params, out, rm=None, overwrite=False, threads=1):
    stage = {"reward": cfg.reward}.get(method) or (cfg.online if method in ONLINE else cfg.offline)
    tag = "reward" if method == "reward" else f"{method}-{_tag(params)}"
    model = {"name_or_path": setup["pi0"], **({"reward_model": rm} if rm else {})}
    data = cell["dir"] / ("prompts.jsonl" if method in ONLINE else "pairs.jsonl")
    algo = {**stage.algo, **cfg.fixed_algo(method), **params}
    run = {"name": tag, "output_dir": str(out / "runs" / f"n{n}-s{seed}"), "seed": seed,
           "eval_every": _eval_every(stage, n, cfg.eval_points)}
    econf = _engine_config(cfg, stage, model=model, data=str(data), run=run, algo=algo)
    return {
        "method": method, "n": n, "seed": seed, "tag": tag, "params": params, "config": econf,
        "world": asdict(cfg.world), "pi0": setup["pi0"], "val": cell["val"],
        "logp_ref": setup["logp_ref"].tolist(), "overwrite": overwrite, "threads": threads,
    }


def run_grid(
    cfg: SyntheticConfig, out: str | Path, overwrite: bool = False, log: Log = print
) -> dict[str, Any]:
    """Run the whole grid; returns (and writes) the results, see ``results.summarise``."""
    from distalign.synthetic.results import summarise, write_outputs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _quiet()
    setup = prepare_world(cfg, out, log)
    world = setup["world"]
    cells: dict[tuple[int, int], Any] = {}
    for seed in cfg.seeds:
        cells.update(_cell_data(cfg, world, setup["logp_ref"], out, seed))
    threads = 1 if cfg.workers > 1 else None

    def job(method, n, seed, params, rm=None):
        return _job(cfg, setup, cells[(n, seed)], method, n, seed, params, out, rm, overwrite,
                    threads)

    needs_rm = any(m in ONLINE for m in cfg.methods)
    # biggest cells first: their runs are the longest, so they should not start last
    order = sorted(cells, key=lambda c: (-c[0], c[1]))
    stages = [_stage(job("reward", n, s, {})) for n, s in order if needs_rm]
    stages += [_stage(job(m, n, s, p)) for n, s in order for m in cfg.methods if m not in ONLINE
               for p in cfg.grids[m]]
    for n, s in order:  # each on-policy run starts once its cell's reward model is done
        rm = str(out / "runs" / f"n{n}-s{s}" / "reward" / "final")
        stages += [_stage(job(m, n, s, p, rm), deps=(f"n{n}-s{s}/reward",))
                   for m in cfg.methods if m in ONLINE for p in cfg.grids[m]]
    records = _execute(stages, cfg.workers, overwrite, log)
    results = summarise(cfg, setup, records, time.perf_counter() - t_start)
    write_outputs(results, out)
    return results


def _stage(job: dict[str, Any], deps: tuple[str, ...] = ()) -> RunStage:
    run = job["config"]["run"]
    return RunStage(name=f"n{job['n']}-s{job['seed']}/{job['tag']}", kind="train",
                 target="distalign.synthetic.experiment:run_job", spec={"job": job},
                 out=Path(run["output_dir"]) / run["name"], deps=deps)


def _execute(stages: list[RunStage], workers: int, overwrite: bool, log: Log) -> list[dict]:
    """Run the grid's stages through the pipeline runner (one scheduler in the codebase)."""
    records: list[dict] = []

    def done(outcome: Outcome) -> None:
        rec = dict(outcome.result)
        if outcome.reused:
            rec.update(seconds=0.0, reused=True)
        records.append(rec)
        m = rec["metrics"]
        kl = m.get("kl_fwd", m.get("rm_kl_fwd", float("nan")))
        how = "reused" if rec.get("reused") else f"{rec['seconds']:.0f}s"
        log(f"[{len(records)}/{len(stages)}] n={rec['n']} seed={rec['seed']} {rec['tag']}: "
            f"KL(π*‖·)={kl:.4f} ({how})")

    run_stages(stages, workers=workers, force=overwrite, log=lambda _: None, on_done=done)
    return records
