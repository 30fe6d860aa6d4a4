"""One engine run of ``distalign synthetic`` and the world's side of its grid.

Layout of the output directory ``out``::

    world.json            the world (deterministic in its config)
    pi0/                  the SFT run that made π₀ (π₀ = pi0/final); light_init/ (light R̂ start)
    data/n{n}-s{seed}/    pairs.jsonl (D_n), prompts.jsonl (its prompts), val.jsonl
    runs/n{n}-s{seed}/    offline runs, and the standard variant's reward/ and on-policy runs
    runs/n{n}-s{seed}/light/   the light variant's reward/ and on-policy runs
    synthetic_results.json, synthetic_table.md, claims.md, synthetic_kl.png, ...

Here: π₀ by SFT and the nested data (:func:`prepare_world`, :func:`cell_data`), the spec of
each engine run (:func:`make_job`) and the run itself (:func:`run_job`: ``load_config`` +
``train`` with the exact-metrics callback). Scheduling the runs and adapting the grid between
rounds is a pipeline plan: ``distalign.pipeline.synthetic_grid``.
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

from distalign.synthetic import adapt
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
from distalign.train import load_config, train
from distalign.train.config import to_yaml
from distalign.train.rundir import clear_run, is_finished, read_metrics

Log = Callable[[str], None]


def quiet(threads: int | None = None) -> None:
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


def _engine_config(cfg: SyntheticConfig, stage_run: dict, stage: Stage,
                   **sections: Any) -> dict[str, Any]:
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
    """One engine run with the exact-metrics callback. A run directory that finished this very
    config is reused (read through ``distalign.train.rundir``); a raised budget continues its
    run from the last checkpoint (the engine resumes under a longer horizon)."""
    config = load_config(job["method"], job["config"])
    run_dir = config.run_dir
    record = {k: job[k] for k in ("method", "variant", "n", "seed", "tag", "params", "level")}
    record["run_dir"] = str(run_dir)
    if not job.get("overwrite") and is_finished(run_dir, to_yaml(config)):
        last = read_metrics(run_dir)[-1]  # the final step is always evaluated and logged
        record.update(metrics=_synthetic(last), seconds=0.0, reused=True)
    else:
        if job.get("overwrite"):  # not run.overwrite: config.yaml must stay this job's config
            clear_run(run_dir, "distalign synthetic --overwrite")
        quiet(job.get("threads"))
        ev = _evaluator(job["world"], job["pi0"], job["logp_ref"])
        val = PairSet(*(torch.tensor(job["val"][k]) for k in ("x", "chosen", "rejected")))
        callback = ExactMetricsCallback(ev, val, target=_target(ev, job))
        t0 = time.perf_counter()
        train(config, callbacks=[callback])
        last = {k: v for k, v in callback.history[-1].items() if k != "step"}
        record.update(metrics=_synthetic(last), seconds=time.perf_counter() - t0, reused=False)
    if job["method"] in ONLINE:  # the whole curve, across a continued run's two parts
        curve = [r["synthetic/obj_gap"] for r in read_metrics(run_dir) if "synthetic/obj_gap" in r]
        record.update(_convergence(job, curve))
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
    if not is_finished(out / "pi0"):
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


def cell_data(cfg: SyntheticConfig, world: World, logp_ref: torch.Tensor, out: Path,
              seed: int) -> dict[tuple[int, int], dict[str, Any]]:
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


def cell_name(variant: str, n: int, seed: int) -> str:
    """A cell's runs folder below ``out/runs`` (the light variant's runs sit in light/)."""
    return f"n{n}-s{seed}" + ("/light" if variant == "light" else "")


def make_job(cfg: SyntheticConfig, setup: dict[str, Any], cell: dict[str, Any],
             key: tuple[str, str, int, int], params: dict[str, float], level: int, out: Path,
             overwrite: bool = False, threads: int | None = 1) -> dict[str, Any]:
    """The runner spec of one engine run; ``key`` = (variant, method, n, seed)."""
    variant, method, n, seed = key
    stage = (cfg.reward_stage(variant) if method == "reward"
             else cfg.online if method in ONLINE else cfg.offline)
    factor = cfg.convergence.raise_factor
    tag = "reward" if method == "reward" else f"{method}-{_tag(params)}"
    cdir = out / "runs" / cell_name(variant, n, seed)
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
