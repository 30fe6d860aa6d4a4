"""One-GPU check at Pythia-2.8B shape: time, MFU and peak memory of the training paths.

    python benchmarks/gpu_check.py                      # one H100: about 5 minutes, under 8
    python benchmarks/gpu_check.py --device cpu --tiny  # every code path in seconds (a test)

Nothing is downloaded: the policy is a GPTNeoX built from Pythia-2.8B's config (32 layers,
hidden 2560, 32 heads, vocabulary 50304) with random weights, saved once to a temporary
folder; the reward and value models are Pythia-410M-shaped scorers (24 layers, hidden 1024),
which keeps the full fine-tuning rlhf row well inside 80 GB. Prompts are random words of the
test tokenizer (512 tokens), responses 53 tokens (the paper's TL;DR settings). Weights are
bf16 throughout (``model.dtype=bfloat16``), full fine-tuning uses gradient checkpointing.

Rows: a DPO step and an rlhf iteration (sampling, scoring, 4 PPO epochs), each with full
fine-tuning and with LoRA (r 16, every linear layer); then the sharded code path (FSDP2 with
one process, ``torchrun --nproc_per_node 1``: the same fully_shard, gathered generate and
distributed checkpoint code as several GPUs, without the communication); then the suite's
tests marked ``cuda``. Each row reports its last step (``--steps``, default 2: the first pays
one-off start-up costs).

FLOPs per step (stated, the usual 2·N per token forward and 6·N per token trained; attention
and gradient-checkpointing recomputation left out, so MFU is model FLOPs utilisation):
  DPO:  6·N·T (policy update) + 2·N·T (π₀),  T = tokens of the pair batch (stacked rows);
  rlhf: 2·N·G (sampling, G generated tokens) + 2·(2N + N_r + N_v)·T (old log-probs, π₀,
        reward, values) + k·6·(N + N_v)·T (k PPO epochs on policy and value), T = tokens of
        the rollouts. LoRA rows count the same FLOPs (LoRA skips the frozen weights'
        gradients, so their MFU is a throughput figure on the same scale).
N, N_r, N_v: parameters of the policy, reward and value models (embeddings included).
MFU = FLOPs / step time / peak; peak = 989 TFLOP/s (H100 SXM, bf16 dense; ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, pin_threads

SHAPES = {  # (layers, hidden, heads, vocab): Pythia 2.8B and 410M, and a tiny stand-in
    "policy": (32, 2560, 32, 50304),
    "scorer": (24, 1024, 16, 50304),
    "tiny": (2, 64, 4, 256),
}
ROWS = ("dpo full", "dpo lora", "rlhf full", "rlhf lora")
FSDP_ROWS = ("fsdp2 dpo full", "fsdp2 rlhf lora")


def _config(shape: tuple[int, int, int, int], tok: Any) -> Any:
    from transformers import GPTNeoXConfig

    layers, hidden, heads, vocab = shape
    return GPTNeoXConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        intermediate_size=4 * hidden, vocab_size=vocab, rotary_pct=0.25,
        max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, num_labels=1)


def build(work: Path, device: str, tiny: bool) -> dict[str, Any]:
    """Random-weight models and a pair dataset under ``work``; returns their paths."""
    import torch
    from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    from distalign.testing import WORDS, tiny_tokenizer

    tok = tiny_tokenizer()
    dtype = torch.float32 if tiny else torch.bfloat16
    paths = {}
    for name, cls, shape in (("policy", GPTNeoXForCausalLM, "policy"),
                             ("reward", GPTNeoXForSequenceClassification, "scorer")):
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds, not minutes
            model = cls(_config(SHAPES["tiny" if tiny else shape], tok)).to(dtype)
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
        del model
        paths[name] = str(work / name)
    rng = random.Random(0)
    prompt, response = (12, 6) if tiny else (512, 53)
    words = [w for w in WORDS if w.isalpha()]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [{"prompt": text(prompt), "chosen": text(response), "rejected": text(response)}
            for _ in range(64)]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["data"] = str(work / "pairs.jsonl")
    if device == "cuda":
        torch.cuda.empty_cache()
    return paths


def run_row(row: str, paths: dict[str, Any], work: Path, args: argparse.Namespace) -> dict:
    """Train one row's configuration for ``args.steps`` steps; its last step's figures."""
    import torch

    from distalign.train import load_config, train

    method, kind = row.split()[-2:]
    tiny = args.tiny
    cfg = {
        "model": {"name_or_path": paths["policy"], "reward_model": paths["reward"],
                  "dtype": "float32" if tiny else "bfloat16",
                  "gradient_checkpointing": kind == "full"},
        "data": {"path": paths["data"]},
        "gen": {"max_new_tokens": 6 if tiny else 53, "min_new_tokens": 6 if tiny else 53,
                "temperature": 0.7},
        "run": {"name": row.replace(" ", "-"), "output_dir": str(work / "runs"),
                "batch_size": 2 if tiny else (8 if method == "dpo" else 16),
                "max_steps": args.steps, "progress": False, "overwrite": True},
    }
    overrides = ["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32"] \
        if kind == "lora" else []
    if args.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_dir = train(load_config(method, cfg, overrides))
    wall = time.perf_counter() - t0
    last = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    tokens = last["tokens_per_s"] * last["step_time"]
    rows = cfg["run"]["batch_size"]
    generated = last.get("env/response_tokens", 0.0) * rows if method == "rlhf" else 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return {"row": row, "step_s": last["step_time"], "gen_s": last["time/generate"],
            "tokens": tokens, "generated": generated, "peak_gib": peak, "wall_s": wall,
            "flops": step_flops(method, tokens, generated, paths)}


def _params(path: str) -> int:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    import torch

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    # the LM or score head sits outside AutoModel's backbone
    head = config.vocab_size * config.hidden_size if "CausalLM" in config.architectures[0] \
        else config.hidden_size
    return sum(p.numel() for p in model.parameters()) + head


def step_flops(method: str, tokens: float, generated: float, paths: dict[str, Any]) -> float:
    """The FLOP count the module doc states."""
    n = _params(paths["policy"])
    if method == "dpo":
        return 6 * n * tokens + 2 * n * tokens
    n_r = n_v = _params(paths["reward"])
    k = 4  # rlhf's update_epochs (Table 5), one mini-batch per epoch
    return 2 * n * generated + 2 * (2 * n + n_r + n_v) * tokens + k * 6 * (n + n_v) * tokens


def fsdp_rows(paths: dict[str, Any], work: Path, args: argparse.Namespace) -> list[dict]:
    """The FSDP2 rows in one ``torchrun --nproc_per_node 1`` child (a process group, which
    the sharded path needs, and accelerate state of its own)."""
    (work / "paths.json").write_text(json.dumps(paths))
    env = {**pin_threads(1 if args.tiny else 8), "ACCELERATE_USE_FSDP": "true",
           "FSDP_VERSION": "2", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES",
                                                                        "0")}
    if args.device == "cpu":
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", str(29500 + os.getpid() % 1000), __file__, "--fsdp-child",
           str(work), "--device", args.device, "--steps", str(args.steps)]
    cmd += ["--tiny"] if args.tiny else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write((proc.stdout + proc.stderr)[-4000:])
        return [{"row": r, "error": f"exit {proc.returncode}"} for r in FSDP_ROWS]
    return json.loads((work / "fsdp.json").read_text())


def fsdp_child(work: Path, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    from distalign.train import sharding

    placed: list[bool] = []
    real = sharding.Sharded.place_models

    def place_models(self, *a: Any) -> None:  # a row that ran sharded passes here
        placed.append(True)
        real(self, *a)

    sharding.Sharded.place_models = place_models  # type: ignore[method-assign]
    paths = json.loads((work / "paths.json").read_text())
    out = []
    for row in FSDP_ROWS:
        placed.clear()
        result = run_row(row, paths, work, args)
        out.append(result if placed else {"row": row, "error": "ran unsharded"})
    (work / "fsdp.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def cuda_tests(args: argparse.Namespace) -> str:
    """The suite's tests marked ``cuda`` (``pytest -m cuda``), as one line."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode == 5:
        return "no test is marked cuda"
    return f"exit {proc.returncode}: {lines[-1] if lines else ''}"


def table(rows: list[dict], peak_tflops: float | None) -> str:
    head = f"{'row':<17} {'step s':>7} {'gen s':>7} {'tokens':>8} {'TFLOP':>8} " \
           f"{'MFU':>6} {'peak GiB':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['row']:<17} {r['error']}")
            continue
        tflop = r["flops"] / 1e12
        mfu = f"{tflop / r['step_s'] / peak_tflops:6.1%}" if peak_tflops else f"{'-':>6}"
        peak = f"{r['peak_gib']:9.1f}" if r["peak_gib"] is not None else f"{'-':>9}"
        out.append(f"{r['row']:<17} {r['step_s']:7.2f} {r['gen_s']:7.2f} {r['tokens']:8.0f} "
                   f"{tflop:8.2f} {mfu} {peak}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (code paths only)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--tests", action=argparse.BooleanOptionalAction, default=None,
                   help="run `pytest -m cuda` (default: on cuda)")
    p.add_argument("--timeout", type=int, default=400, help="seconds for each child process")
    p.add_argument("--fsdp-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.fsdp_child is not None:
        fsdp_child(args.fsdp_child, args)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --device cpu --tiny")
    if args.device == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distalign-gpu-check-") as tmp:
        work = Path(tmp)
        paths = build(work, args.device, args.tiny)
        built = time.perf_counter() - t0
        rows = [run_row(row, paths, work, args) for row in ROWS]
        rows += fsdp_rows(paths, work, args)
    tests = cuda_tests(args) if (args.tests if args.tests is not None
                                 else args.device == "cuda") else "not run"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = None if args.device == "cpu" else args.peak_tflops
    print(f"distalign gpu_check on {device}{' (tiny)' if args.tiny else ''}: models built in "
          f"{built:.0f} s, {args.steps} steps per row, the last one reported")
    print(table(rows, peak))
    print(f"cuda-marked tests: {tests}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
