"""The response space of a tilted world, and sampling and scoring replies in it.

A reply is at most L new tokens sampled at temperature 1 with top-k and top-p off (so ln π of
the sampler is the model's own density). A reply that emits EOS within L tokens ends there
(its ids include the EOS); a reply cut at L has the probability of its L-token prefix. Under
that convention π(·|x) is a proper distribution on the space for *every* model, so π₀, π* and
each π̂ are compared on one set. Every policy is scored by :func:`reply_logprobs`, the same
masked sum that :func:`distalign.lm.logprobs.sequence_logprobs` gives over the reply's ids;
the sampler's recorded log-probs are that sum too (checked in tests/test_tilted_space.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distalign.jsonsafe import cut_torn_line
from distalign.lm.collators import pad_sequences
from distalign.lm.generation import GenerationConfig, HFSampler, stop_token_ids
from distalign.progress import StepProgress


def eos_ids(tok: Any, model: nn.Module | None = None) -> list[int]:
    """The stop tokens a reply ends at: the tokenizer's EOS plus the checkpoint's own."""
    ids = [tok.eos_token_id] if isinstance(tok.eos_token_id, int) else list(tok.eos_token_id)
    return stop_token_ids(ids, getattr(model, "generation_config", None))


def to_response(ids: Sequence[int], eos: Sequence[int], max_new_tokens: int
                ) -> tuple[list[int], bool]:
    """(ids, ended) of any token sequence mapped into the L-token space: cut after its first
    EOS, then to L tokens; it has ended iff an EOS is among those L."""
    out: list[int] = []
    stop = set(eos)
    for t in ids[:max_new_tokens]:
        out.append(int(t))
        if int(t) in stop:
            return out, True
    return out, False


@dataclass
class Replies:
    """Replies to a list of prompts, ``n`` per prompt, prompt-major (row = prompt·n + j)."""

    prompt_index: list[int]
    reply_ids: list[list[int]]
    ended: list[bool]
    # ln π of each reply token at T = 1 as the sampler computed it (None: not recorded)
    token_logprobs: list[list[float]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.reply_ids)

    @property
    def logp(self) -> list[float]:
        """ln π(y|x) from the sampler: the sum over the reply's tokens (EOS included)."""
        if self.token_logprobs is None:
            raise ValueError("these replies carry no recorded log-probs")
        return [float(sum(t)) for t in self.token_logprobs]

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.reply_ids]

    def cut(self, max_new_tokens: int, eos: Sequence[int]) -> Replies:
        """The same draws seen in a smaller space: a reply of π in the L-space, cut to L' < L
        tokens, is an exact draw of π in the L'-space (its prefix has the prefix's mass)."""
        ids, ended, lps = [], [], []
        for k, r in enumerate(self.reply_ids):
            c, e = to_response(r, eos, max_new_tokens)
            ids.append(c)
            ended.append(e)
            if self.token_logprobs is not None:
                lps.append(self.token_logprobs[k][: len(c)])
        return Replies(list(self.prompt_index), ids, ended,
                       lps if self.token_logprobs is not None else None)

    def groups(self, values: Sequence[float]) -> list[np.ndarray]:
        """``values`` (one per row) grouped per prompt, in prompt order."""
        by: dict[int, list[float]] = {}
        for i, v in zip(self.prompt_index, values, strict=True):
            by.setdefault(i, []).append(float(v))
        return [np.asarray(by[i]) for i in sorted(by)]

    def texts(self, tok: Any) -> list[str]:
        """The replies as text (special tokens dropped), as ``distalign generate`` writes them."""
        return [tok.decode(r, skip_special_tokens=True) for r in self.reply_ids]


def _seed(seed: int, first: int, rows: int) -> int:
    digest = hashlib.sha256(json.dumps([seed, first, rows]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sampler(tok: Any, max_new_tokens: int) -> HFSampler:
    """π's own distribution on the space: T = 1, no top-k/top-p, no minimum length."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, temperature=1.0,
                           top_k=0, top_p=1.0, record_logprobs=True)
    return HFSampler(tok, cfg)


def _read_journal(path: Path, ident: str) -> dict[int, dict[str, Any]]:
    """The batches a killed run finished (its torn last line cut off); a journal of other
    settings is emptied, so the run starts over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        return {}
    cut_torn_line(path)
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if any(r.get("id") != ident for r in recs):
        path.write_text("", encoding="utf-8")
        return {}
    return {int(r["b0"]): r for r in recs}


@torch.no_grad()
def sample_replies(model: nn.Module, tok: Any, prompt_ids: Sequence[Sequence[int]], n: int,
                   max_new_tokens: int, seed: int = 0, rows_per_batch: int = 32,
                   progress: bool = False, journal: Path | None = None,
                   key: str = "") -> Replies:
    """``n`` replies y ~ π(·|x) per prompt with ln π recorded by the sampler. Each batch seeds
    its own RNG from (seed, its first prompt, its size): reruns give the same replies. With a
    ``journal`` file each finished batch is appended to it, and a rerun after a kill samples
    only the batches it lacks (``key`` names the model: another key, or other settings, start
    over)."""
    s = sampler(tok, max_new_tokens)
    per = max(1, rows_per_batch // n)
    ident = hashlib.sha256(json.dumps(
        [key, seed, n, max_new_tokens, per, [list(map(int, p)) for p in prompt_ids]]
    ).encode()).hexdigest()[:16]
    done = _read_journal(journal, ident) if journal is not None else {}
    out = Replies([], [], [], [])
    starts = range(0, len(prompt_ids), per)
    with StepProgress("sample", len(starts), enabled=progress,
                      every=max(len(starts) // 10, 1)) as bar:
        for k, b0 in enumerate(starts):
            batch = prompt_ids[b0 : b0 + per]
            rec = done.get(b0) or _sample_batch(s, model, tok, batch, n,
                                                _seed(seed, b0, len(batch)))
            out.prompt_index.extend(b0 + i for i in rec["index"])
            out.reply_ids.extend(rec["reply_ids"])
            out.ended.extend(rec["ended"])
            out.token_logprobs.extend(rec["token_logprobs"])  # type: ignore[union-attr]
            if journal is not None and b0 not in done:
                with journal.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"id": ident, "b0": b0, **rec}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            bar.update(k + 1)
    return out


def _sample_batch(s: HFSampler, model: nn.Module, tok: Any, batch: Sequence[Sequence[int]],
                  n: int, seed: int) -> dict[str, Any]:
    """One seeded batch of ``n`` replies per prompt, prompt-major (``index``: the prompt)."""
    device = next(model.parameters()).device
    ids, attn = pad_sequences([list(p) for p in batch], tok.pad_token_id, "left")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        roll = s.generate(model, ids.to(device), attn.to(device), n)
    resp, lengths = roll.responses.cpu(), roll.response_lengths.cpu().tolist()
    ended, lps = roll.ended.cpu().tolist(), roll.logprobs.double().cpu()
    B = len(batch)
    rows = [j * B + b for b in range(B) for j in range(n)]  # sample-major → prompt-major
    return {"index": [b for b in range(B) for _ in range(n)],
            "reply_ids": [resp[r, : lengths[r]].tolist() for r in rows],
            "ended": [bool(ended[r]) for r in rows],
            "token_logprobs": [lps[r, : lengths[r]].tolist() for r in rows]}


@torch.no_grad()
def reply_logprobs(model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                   reply_ids: Sequence[Sequence[int]], pad_id: int,
                   batch_size: int = 16) -> list[float]:
    """ln π(y|x) of each (prompt, reply) at T = 1: the sum over the reply's ids, so a reply
    cut at L gets its prefix's probability and an ended one includes its EOS."""
    from distalign.eval.judges.reward import length_batches
    from distalign.lm.logprobs import sequence_logprobs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [float("nan")] * len(reply_ids)
    try:
        seqs = list(zip(prompt_ids, reply_ids, strict=True))
        for idx, ids, attn, resp in length_batches(seqs, pad_id, batch_size):
            lp = sequence_logprobs(model, ids.to(device), attn.to(device), resp.to(device))
            for i, v in zip(idx, lp.double().cpu().tolist(), strict=True):
                out[i] = float(v)
    finally:
        model.train(was_training)
    return out
