"""Reward-model scoring (RM score) and the ``reward:DIR`` judge, P(a ≻ ref) = σ(R̂(a) − R̂(ref)).

R̂ is read at the last real token (:func:`distalign.lm.scoring.sequence_scores`, the reward of
eq. (1) on the final token), in batched forwards over length-sorted rows. Sampled outputs are
scored on their exact ids (``prompt_token_ids + output_token_ids``). A reference reply is
tokenised the way the reward model saw responses in training (``distalign.lm.data``): plain
prompts get the reply's ids plus EOS; chat prompts get the assistant turn the chat template
adds after the generation prompt, cut after its end-of-turn EOS.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distalign.errors import ConfigError
from distalign.eval.judges.base import Pair, Verdict
from distalign.lm.collators import pad_sequences


def resolve_model_dir(path: str) -> str:
    """A run directory means its ``final/``; anything else (a model dir, a hub id) as given."""
    from distalign.lm.sources import resolve_model_path

    return resolve_model_path(path)


def split_gguf(spec: str) -> tuple[str, str | None]:
    """``DIR@FILE.gguf`` → (DIR, FILE.gguf); anything else → (spec, None)."""
    path, sep, gguf = spec.rpartition("@")
    return (path, gguf) if sep and gguf.endswith(".gguf") else (spec, None)


def load_scorer_dir(spec: str) -> tuple[Any, Any]:
    """(frozen reward model, its tokenizer) from a directory written by the engine or HF
    (``DIR@FILE.gguf`` for a GGUF file)."""
    from distalign.lm.models import ModelConfig, load_scorer, load_tokenizer

    path, gguf = split_gguf(spec)
    cfg = ModelConfig(name_or_path=resolve_model_dir(path), gguf_file=gguf)
    tok = load_tokenizer(cfg)
    model = load_scorer(
        cfg.name_or_path, cfg, 1, tok.pad_token_id, head="error", what="reward model"
    ).eval()
    arch = getattr(model.config, "architectures", None) or []
    if arch and all(a.endswith("ForCausalLM") for a in arch):  # its score head would be random
        raise ConfigError(f"{spec}: a causal LM ({arch[0]}), not a reward model with a trained "
                          "score head; train one with `distalign train reward`")
    return model.requires_grad_(False), tok


def reference_ids(tok: Any, prompt: str, reference: str, chat: bool) -> list[int]:
    """Response ids of a human reference reply, as ``distalign.lm.data`` builds them."""
    eos = tok.eos_token_id
    if chat:
        user = [{"role": "user", "content": prompt}]
        p_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*user, {"role": "assistant", "content": reference}],
                                       tokenize=False)
        if full.startswith(p_text):
            ids = list(tok(full[len(p_text):], add_special_tokens=False)["input_ids"])
            return ids[: len(ids) - ids[::-1].index(eos)] if eos in ids else [*ids, eos]
    ids = list(tok(reference, add_special_tokens=False)["input_ids"])
    return ids if ids[-1:] == [eos] else [*ids, eos]


def length_batches(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, batch_size: int
) -> Iterator[tuple[list[int], Tensor, Tensor, Tensor]]:
    """(row indices, input_ids, attention_mask, response_mask) of right-padded prompt+response
    batches, rows sorted by length so that padding stays small."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, attn = pad_sequences([[*seqs[i][0], *seqs[i][1]] for i in idx], pad_id, "right")
        resp = torch.zeros_like(attn)
        for row, i in enumerate(idx):
            p, r = len(seqs[i][0]), len(seqs[i][1])
            resp[row, p : p + r] = 1
        yield idx, ids, attn, resp


@torch.no_grad()
def score_sequences(
    model: Any,
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """R̂ of (prompt ids, response ids) rows: one forward per batch, never per row."""
    from distalign.lm.scoring import sequence_scores

    device = next(model.parameters()).device
    out = [math.nan] * len(seqs)
    for idx, ids, attn, resp in length_batches(seqs, pad_id, batch_size):
        scores = sequence_scores(model, ids.to(device), attn.to(device), resp.to(device))
        for i, v in zip(idx, scores.tolist(), strict=True):
            out[i] = float(v)
        if progress is not None:
            progress(len(idx))
    return out


def model_fingerprint(spec: str) -> str:
    """A short id of a model directory's current files (names, sizes, mtimes): cached scores of
    a reward model that is retrained in place are not reused."""
    path, gguf = split_gguf(spec)
    root = Path(resolve_model_dir(path))
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else []
    if gguf:
        files.append(root / gguf)
    stats = [(str(f.relative_to(root)) if f.is_relative_to(root) else str(f),
              f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return hashlib.sha256(json.dumps([str(root.resolve()), stats]).encode()).hexdigest()[:16]


def cached_scores(
    model: Any,
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    batch_size: int,
    cache: Any,
    fingerprint: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], int]:
    """(scores, how many were computed) of :func:`score_sequences` through a judge cache: a
    pipeline scores the same references for every model, and the RM-score column's outputs
    again in the RM judge. A cached score was computed in another batch, so it may differ
    from a fresh one in the last float bits (padding changes the kernels' sums)."""
    if cache is None:
        return score_sequences(model, seqs, pad_id, batch_size, progress), len(seqs)
    name = f"score:{fingerprint}"
    keys = [(json.dumps(list(p)), json.dumps(list(r))) for p, r in seqs]
    out: list[float | None] = []
    for a, b in keys:
        hit = cache.get(name, None, "", a, b)
        out.append(None if hit is None or hit[0] is None else float(hit[0]))
    todo = [i for i, v in enumerate(out) if v is None]
    if progress is not None and len(todo) < len(seqs):
        progress(len(seqs) - len(todo))
    fresh = score_sequences(model, [seqs[i] for i in todo], pad_id, batch_size, progress)
    cache.put_many(name, None, [("", *keys[i], v, "") for i, v in zip(todo, fresh, strict=True)])
    for i, v in zip(todo, fresh, strict=True):
        out[i] = v
    return [float(v) for v in out], len(todo)  # type: ignore[arg-type]


def sigmoid(x: float) -> float:
    """σ(x) without overflow for large |x|."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class RewardJudge:
    """P(a ≻ ref) = σ(R̂(a) − R̂(ref)): the Bradley–Terry model (eq. (2)) of the reward model.

    The reward model scores the policy's token ids, so its tokenizer must be the policy's
    (checked with :func:`distalign.lm.tokenizers.check_same_tokenizer`)."""

    template_id = None

    def __init__(self, path: str, batch_size: int = 16, policy_tokenizer: Any = None,
                 chat: bool = False, cache: Any = None) -> None:
        from distalign.lm.tokenizers import check_same_tokenizer

        self.id = f"reward:{path}"
        self.model, self.tok = load_scorer_dir(path)
        if policy_tokenizer is not None:
            check_same_tokenizer(policy_tokenizer, self.tok, "the policy", f"reward judge {path}")
        self.batch_size, self.chat, self.calls = batch_size, chat, 0
        self.cache, self.fingerprint = cache, model_fingerprint(path)
        self.scores: tuple[list[float], list[float]] | None = None  # (outputs, references)

    def judge(self, pairs: Sequence[Pair], progress: bool = True) -> list[Verdict]:
        refs = [(p.prompt_ids, reference_ids(self.tok, p.prompt, p.reference, self.chat))
                for p in pairs]
        outs = [(p.prompt_ids, p.output_ids) for p in pairs]
        r, fresh = cached_scores(self.model, outs + refs, self.tok.pad_token_id,
                                 self.batch_size, self.cache, self.fingerprint)
        self.calls += fresh
        ra, rb = r[: len(pairs)], r[len(pairs) :]
        self.scores = (ra, rb)
        return [Verdict(sigmoid(a - b)) for a, b in zip(ra, rb, strict=True)]
