"""DPO throughput and peak memory: distalign's ``dpo`` against TRL's ``DPOTrainer``.

Both trainers train the SAME locally built Llama (fp32, CPU) on the SAME synthetic preference
rows, with the same batch size, number of steps, optimiser (AdamW, lr 1e-5, linear decay, grad
clipping at 1.0), DPO temperature (γ = TRL's β = 0.1) and torch thread count. Each variant runs
in its own child process, so the peak RSS it reports (``ru_maxrss``) is that trainer's alone.

Fairness:

* every row has exactly ``--prompt-len`` prompt tokens and ``--response-len`` response tokens
  (EOS included) under a word-level tokenizer, so both trainers see identical sequences and
  no padding; tokens/s counts prompt+response tokens of chosen and rejected, the same for both
  (checked per batch);
* the first ``--warmup`` steps are excluded: the clock runs from the end of the last warm-up
  step to the end of the last step (data loading, forward, backward and optimiser included);
* robust to a shared machine: thread counts pinned (OMP/MKL/torch) in every child,
  ``--repeats`` runs interleaved (A B C D A B C D …), process CPU time per step beside wall
  time, and each variant's MEDIAN run reported with the spread (min..max) over runs;
* TRL is configured like ours: no eval, no checkpoints, no trackers, no gradient
  checkpointing, fp32 (its defaults turn on bf16 and checkpointing), non-fused AdamW.
  ``precompute`` variants compute π₀'s log-probs once before training (not timed) in both.

The ceiling: both trainers spend their time in matrix products, so the ratio of their matmul
FLOPs per step (printed, from :func:`step_flops`) bounds the speed-up that doing less work can
buy; a larger measured ratio means TRL also loses time outside the FLOPs (its per-step
statistics, data collation).

Run: ``python benchmarks/dpo_vs_trl.py`` (needs ``pip install -e ".[bench]"``); ``--help``
lists the sizes. Results of a run are recorded in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from _common import child_setup, current_rss_mib, peak_rss_mib, pin_threads, run_child, versions

VARIANTS = {
    "trl": "TRL DPOTrainer",
    "ours": "distalign dpo",
    "trl-precompute": "TRL DPOTrainer, precompute_ref_log_probs=True",
    "ours-precompute": "distalign dpo, algo.precompute_ref=true",
}
GAMMA = 0.1  # DPO temperature: our γ, TRL's β
LR = 1e-5


# ------------------------------------------------------------------------------ fixtures
def build_fixtures(work: Path, a: argparse.Namespace) -> None:
    """A word-level tokenizer, a Llama and fixed-length preference rows under ``work``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = [f"w{i}" for i in range(a.vocab - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # whitespace splitting makes tokenize(prompt + response) == tokenize(prompt) + tokenize(
    # response), so TRL's joint tokenisation and our separate one give identical ids
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>",
    )
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads,
        intermediate_size=4 * a.hidden, max_position_embeddings=a.prompt_len + a.response_len,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")

    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [
        {
            "prompt": text(a.prompt_len),
            # one word fewer: both trainers append the EOS token to each response
            "chosen": " " + text(a.response_len - 1),
            "rejected": " " + text(a.response_len - 1),
        }
        for _ in range(a.batch_size * (a.warmup + a.steps))
    ]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------ children
def run_ours(work: Path, out: Path, a: argparse.Namespace, precompute: bool) -> dict:
    from distalign.train import engine, load_config, train

    cpu: list[float] = []  # process CPU time at the end of each step (robust on a busy host)
    update = engine.Trainer._update

    def timed_update(self, exp, step):
        out = update(self, exp, step)
        cpu.append(time.process_time())
        return out

    engine.Trainer._update = timed_update  # instrumentation only: the step itself is unchanged
    cfg = load_config(
        "dpo",
        {
            "model": {"name_or_path": str(work / "model")},
            "data": {"path": str(work / "pairs.jsonl")},
            "optim": {"lr": LR, "scheduler": "linear", "max_grad_norm": 1.0},
            "run": {
                "name": "ours", "output_dir": str(out), "batch_size": a.batch_size,
                "max_steps": a.warmup + a.steps, "progress": False, "log_every": 1,
                "resume": False, "overwrite": True, "num_samples_logged": 0,
            },
            "algo": {"gamma": GAMMA, "precompute_ref": precompute},
        },
    )
    run_dir = train(cfg)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1]
    # metrics rows are written right after each step; their wall time marks the step's end
    ends = [r["time"] for r in steps]
    tokens = [round(r["tokens_per_s"] * r["step_time"]) for r in steps]
    return {"ends": ends, "cpu": cpu, "tokens": tokens, "loss": steps[-1]["loss"]}


def run_trl(work: Path, out: Path, a: argparse.Namespace, precompute: bool) -> dict:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu: list[float] = []
            self.training = False

        def on_train_begin(self, *args, **kwargs):
            self.training = True

        def on_step_end(self, *args, **kwargs):
            self.ends.append(time.time())
            self.cpu.append(time.process_time())

    clock = StepClock()
    ds = load_dataset("json", data_files=str(work / "pairs.jsonl"), split="train")
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=a.batch_size,
        max_steps=a.warmup + a.steps, learning_rate=LR, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=GAMMA, max_length=None,
        optim="adamw_torch", gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, seed=0, precompute_ref_log_probs=precompute,
        model_init_kwargs={"dtype": "float32"},
    )
    trainer = DPOTrainer(
        model=str(work / "model"), args=args, train_dataset=ds,
        processing_class=_tokenizer(work),
    )
    trainer.add_callback(clock)
    tokens: list[int] = []
    collate = trainer.data_collator

    def counting(examples):  # count the tokens of every training batch, like ours
        batch = collate(examples)
        if clock.training:
            tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    out = trainer.train()
    return {"ends": clock.ends, "cpu": clock.cpu, "tokens": tokens, "loss": out.training_loss}


def _tokenizer(work: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(work / "model")


def child(variant: str, work: Path) -> None:
    a = argparse.Namespace(**json.loads((work / "spec.json").read_text()))
    child_setup(a.threads)
    rss_imports = current_rss_mib()
    base = variant.split("@")[0]  # "ours@alt": the same runner on another checkout
    runner = run_trl if base.startswith("trl") else run_ours
    res = runner(work, work / "runs" / variant, a, base.endswith("precompute"))
    ends, tokens = res["ends"], res["tokens"]
    expected = 2 * a.batch_size * (a.prompt_len + a.response_len)
    if len(ends) != a.warmup + a.steps or any(t != expected for t in tokens[-a.steps :]):
        raise SystemExit(f"{variant}: unexpected steps/tokens {len(ends)} {tokens}")
    seconds = ends[-1] - ends[a.warmup - 1]
    def median_step(stamps: list[float]) -> float:  # robust to a step slowed by other load
        gaps = [b - e for e, b in zip(stamps[a.warmup - 1 : -1], stamps[a.warmup :], strict=True)]
        return statistics.median(gaps)

    step_s = median_step(ends)
    out = {
        "variant": variant,
        "tokens_per_s": sum(tokens[a.warmup :]) / seconds,
        "median_tokens_per_s": expected / step_s,
        "step_s": seconds / a.steps,
        "median_step_s": step_s,
        "median_cpu_step_s": median_step(res["cpu"]),
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_imports_mib": rss_imports,
        "final_loss": res["loss"],
    }
    print("RESULT " + json.dumps(out), flush=True)


# -------------------------------------------------------------------------------- parent
def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved runs; the median run is reported, with the spread")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--workdir", help="keep fixtures and runs here (default: a temp dir)")
    p.add_argument("--alt", help="also run our variants with distalign imported from this "
                   "checkout (A/B of an engine change)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    a = parse()
    if a.child:
        child(a.child, Path(a.workdir))
        return
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if a.alt:  # A/B: our variants again, importing distalign from another checkout
        a.alt = str(Path(a.alt).resolve())
        for v in [v for v in variants if v.startswith("ours")]:
            VARIANTS[f"{v}@alt"] = f"{VARIANTS[v]} [--alt]"
            variants.append(f"{v}@alt")
    if unknown or a.warmup < 1 or a.repeats < 1:
        raise SystemExit(f"unknown variants {unknown} (choose from {list(VARIANTS)}), or "
                         "--warmup/--repeats < 1")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="dpo_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in vars(a).items() if k not in ("child", "workdir", "variants", "alt")}
    (work / "spec.json").write_text(json.dumps(spec))
    child_setup(a.threads)  # quiet transformers' save progress bars
    build_fixtures(work, a)
    env = pin_threads(a.threads)
    env["HF_DATASETS_CACHE"] = str(work / "hf_datasets_cache")  # no cache hits across runs
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    load = [os.getloadavg()[0]]
    for _ in range(a.repeats):  # interleaved, so slow phases of a shared machine hit all
        for v in variants:
            runs[v].append(run_child(__file__, v, work, env, a.alt))
            load.append(os.getloadavg()[0])
    # each variant's median run (by median-step throughput)
    med = {v: sorted(rs, key=lambda r: r["median_tokens_per_s"])[len(rs) // 2]
           for v, rs in runs.items()}
    report(a, med, runs, load)


def step_flops(a: argparse.Namespace, variant: str) -> float:
    """Matmul FLOPs of one training step (forward 1×, backward 2×), as each trainer computes
    it: TRL runs chosen and rejected rows separately and, on CPU, its chunked LM head on every
    position, recomputing the logits in backward; ours packs [x, a⁺, a⁻] in one row and runs
    the head on response positions only (recomputed in backward only past one chunk, not here).
    """
    h, n_layers, vocab, p, r = a.hidden, a.layers, a.vocab, a.prompt_len, a.response_len
    ours, precompute = variant.startswith("ours"), variant.split("@")[0].endswith("precompute")
    tokens = p + 2 * r if ours else 2 * (p + r)  # per pair
    ctx = (p + 2 * r) / 2  # mean causal context, roughly
    per_token = n_layers * (2 * 4 * h * h + 2 * 3 * h * 4 * h + 2 * 2 * h * ctx)
    head_positions = 2 * r if ours else 2 * (p + r)
    policy_head = 3 if ours else 4  # fwd + 2 bwd (+ TRL's recomputation)
    passes = 3 + (0 if precompute else 1)  # policy fwd+bwd, π₀ fwd
    head = head_positions * 2 * h * vocab * (policy_head + (0 if precompute else 1))
    return a.batch_size * (tokens * per_token * passes + head)


def report(a: argparse.Namespace, med: dict[str, dict], runs: dict[str, list[dict]],
           load: list[float]) -> None:
    tok = 2 * a.batch_size * (a.prompt_len + a.response_len)
    print(
        f"DPO, Llama hidden {a.hidden} x {a.layers} layers, vocab {a.vocab}, fp32 CPU, "
        f"{a.threads} threads; batch {a.batch_size} pairs x ({a.prompt_len} prompt + "
        f"{a.response_len} response) tokens = {tok} tokens/step; {a.steps} timed steps "
        f"after {a.warmup} warm-up; median run of {a.repeats} interleaved run(s)"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"1-min load average during the runs: {min(load):.2f}..{max(load):.2f} "
          f"on {os.cpu_count()} CPUs")
    head = (f"{'variant':47} {'tok/s med':>9} {'tok/s avg':>9} {'s/step':>7} "
            f"{'CPU s/step':>10} {'peak RSS MiB':>12} {'final loss':>10}")
    print(head)
    print("-" * len(head))
    for v, r in med.items():
        print(
            f"{VARIANTS[v]:47} {r['median_tokens_per_s']:9.0f} {r['tokens_per_s']:9.0f} "
            f"{r['median_step_s']:7.3f} {r['median_cpu_step_s']:10.3f} "
            f"{r['peak_rss_mib']:12.0f} {r['final_loss']:10.4f}"
        )
    for v, rs in runs.items():
        tok_s = [r["median_tokens_per_s"] for r in rs]
        cpu = [r["median_cpu_step_s"] for r in rs]
        print(f"  {v}: tokens/s per run {', '.join(f'{t:.0f}' for t in tok_s)} (spread "
              f"{min(tok_s):.0f}..{max(tok_s):.0f}); CPU s/step {min(cpu):.3f}..{max(cpu):.3f}; "
              f"{step_flops(a, v) / 1e9:.2f} GFLOP/step")
    for ours, theirs in (("ours", "trl"), ("ours-precompute", "trl-precompute"),
                         ("ours-precompute", "trl"), ("ours@alt", "trl"),
                         ("ours-precompute@alt", "trl-precompute"), ("ours@alt", "ours")):
        if ours in med and theirs in med:
            o, t = med[ours], med[theirs]
            per = sorted(x["median_tokens_per_s"] / y["median_tokens_per_s"]  # same repeat
                         for x, y in zip(runs[ours], runs[theirs], strict=True))
            print(
                f"ratio {ours}/{theirs}: throughput "
                f"{o['median_tokens_per_s'] / t['median_tokens_per_s']:.2f}x (per repeat "
                f"{per[len(per) // 2]:.2f} [{per[0]:.2f}..{per[-1]:.2f}]; CPU time/step: "
                f"{t['median_cpu_step_s'] / o['median_cpu_step_s']:.2f}x less; FLOP ceiling "
                f"{step_flops(a, theirs) / step_flops(a, ours):.2f}x), "
                f"peak RSS {o['peak_rss_mib'] / t['peak_rss_mib']:.2f}x"
            )


if __name__ == "__main__":
    main()
