"""Fixtures and configurations shared by the online benchmarks (``online_vs_trl.py``,
``online_profile.py``): one locally built Llama policy, a reward model on the same tokenizer,
fixed-length text prompts, and our run config for each online method.

Prompts end with a space: TRL scores ``prompt + completion`` as text, and with the
whitespace tokenizer that keeps the prompt's last word and the completion's first word apart, so
the reward model sees the same ids in both trainers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

LR = 1e-5
TEMPERATURE = 0.7
# our method -> the config the pair shares with its TRL peer (see benchmarks/README.md)
METHOD_ALGO: dict[str, dict[str, Any]] = {
    "distill": {"gamma": 0.1, "beta": 0.05},
    "rebel": {"eta": 1.0, "beta": 0.05},
    "rlhf": {"beta": 0.05},
    "rkl": {"beta": 0.05, "gamma": 0.01},
}


def add_size_args(p: argparse.ArgumentParser) -> None:
    """Model and batch sizes, shared by the online benchmarks."""
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration (pairs "
                   "methods and OnlineDPO: 2 samples each; PPO gets 2x the prompts, 1 sample each)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64, help="min = max new tokens")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=1, help="update epochs per batch (ours: "
                   "algo.update_epochs; RLOO: num_iterations; OnlineDPO has 1)")
    p.add_argument("--threads", type=int, default=2)


def build_fixtures(work: Path, a: argparse.Namespace, rows: int) -> None:
    """Tokenizer + Llama policy (``work/model``), reward model (``work/reward``) and
    ``rows`` prompts of exactly ``a.prompt_len`` tokens (``work/prompts.jsonl``)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = [f"w{i}" for i in range(a.vocab - len(specials))]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + words)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads,
        intermediate_size=4 * a.hidden, max_position_embeddings=a.prompt_len + a.response_len,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, tie_word_embeddings=False, num_labels=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).float().save_pretrained(work / "reward")
    tok.save_pretrained(work / "reward")
    rng = random.Random(0)
    lines = [json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(a.prompt_len)) + " "})
             for _ in range(rows)]
    (work / "prompts.jsonl").write_text("\n".join(lines) + "\n")


def ours_config(method: str, work: Path, out: Path, a: argparse.Namespace, steps: int,
                **extra: dict[str, Any]) -> dict[str, Any]:
    """Our run config for ``method`` on the fixtures: ``a.prompts`` prompts per iteration (2x for
    the PPO methods, which draw one sample per prompt), one gradient step per update epoch."""
    prompts = a.prompts * (2 if method in ("rlhf", "rkl") else 1)
    cfg: dict[str, Any] = {
        "model": {"name_or_path": str(work / "model"), "reward_model": str(work / "reward")},
        "data": {"path": str(work / "prompts.jsonl"), "format": "prompt",
                 "max_prompt_length": a.prompt_len, "max_length": a.prompt_len + a.response_len},
        "gen": {"max_new_tokens": a.response_len, "min_new_tokens": a.response_len,
                "temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0},
        "optim": {"lr": LR, "scheduler": "linear", "max_grad_norm": 1.0},
        "run": {"name": method, "output_dir": str(out), "batch_size": prompts,
                "mini_batch_size": prompts, "grad_accum": 1, "max_steps": steps,
                "progress": False, "log_every": 1, "resume": False, "overwrite": True,
                "num_samples_logged": 0, "seed": 0},
        "algo": {**METHOD_ALGO[method], "update_epochs": a.epochs},
    }
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def smollm2_fixtures(work: Path, a: argparse.Namespace, rows: int) -> None:
    """SmolLM2-135M (``work/model``) and its random-head reward model (``work/reward``),
    exported as in ``online_step.py``, and prompts of ``a.prompt_len`` single-token words, so
    both trainers' tokenisations give exactly that many ids."""
    from online_step import prepare
    from transformers import AutoTokenizer

    policy, reward, _ = prepare(work)
    for link, target in (("model", policy), ("reward", reward)):
        if not (work / link).exists():
            (work / link).symlink_to(target.name)
    tok = AutoTokenizer.from_pretrained(policy)
    words = []
    for i in range(200, len(tok)):  # " word" pieces that round-trip as one token
        text = tok.decode([i])
        if text.startswith(" ") and text[1:].isalpha() and tok(text).input_ids == [i]:
            words.append(text)
        if len(words) == 2000:
            break
    rng = random.Random(0)
    lines = [json.dumps({"prompt": "".join(rng.choice(words) for _ in range(a.prompt_len))})
             for _ in range(rows)]
    (work / "prompts.jsonl").write_text("\n".join(lines) + "\n")


def train_flops(a: argparse.Namespace, variant: str) -> float:
    """Matmul FLOPs of one iteration outside generation (forward 1×, backward 2× with trained
    weights, 1× with LoRA's frozen ones), as each trainer computes them. n = 2B samples of
    P + R tokens. Ours: pairs packed [x, a1, a2] (P + 2R per prompt), LM head on response
    positions; TRL on CPU: every row separately, LM head on every position (OnlineDPO's
    full logits; RLOO's fused head, recomputed in backward)."""
    h, layers, vocab, p, r = a.hidden, a.layers, a.vocab, a.prompt_len, a.response_len
    if a.smollm2:  # SmolLM2-135M: 30 layers of 576, MLP 1536, 3 of 9 heads for K/V
        h, layers, vocab, mlp, kv = 576, 30, 49152, 1536, 192
    else:
        mlp, kv = 4 * h, h
    n, bwd = 2 * a.prompts, 1 if a.smollm2 else 2
    per_tok = layers * 2 * (2 * h * h + 2 * h * kv + 3 * h * mlp + h * (p + r))  # + attention
    head = 2 * h * vocab  # per projected position
    seq, packed = n * (p + r) * per_tok, a.prompts * (p + 2 * r) * per_tok
    method = variant.split("@")[0]
    if method in ("distill", "distill-rec", "rebel"):
        fwd = packed + n * r * head
        return (1 if method == "distill-rec" else 2) * fwd + seq + a.epochs * (1 + bwd) * fwd
    if method == "odpo":  # π_θ with gradient, π₀ and R̂ without; full logits
        return (1 + bwd) * (seq + n * (p + r) * head) + seq + n * (p + r) * head + seq
    if method in ("rlhf", "rkl"):  # π_t, π₀, R̂, V; E × (π_θ and V with gradient)
        fwd = seq + n * r * head
        return 2 * fwd + 2 * seq + a.epochs * (1 + bwd) * (fwd + seq)
    if method == "rloo":  # π_t, π₀, R̂; E × π_θ (head recomputed in backward)
        fwd = seq + n * (p + r) * head
        return 2 * fwd + seq + a.epochs * ((1 + bwd) * seq + (2 + bwd) * n * (p + r) * head)
    raise ValueError(variant)
