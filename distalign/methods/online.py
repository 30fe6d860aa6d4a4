"""Shared on-policy experience: two samples per prompt from π_t, scored by the frozen R̂.

Used by REBEL (10) and preference distillation (11)–(12). The sequence reward follows REBEL's
code (the paper leaves this open): r = R̂(x, a) − β·(ln π_t(a|x) − ln π₀(a|x)), with log-probs at
the sampling temperature. An optional penalty replaces R̂ for responses without EOS.
"""

from __future__ import annotations

import torch

from distalign.lm.scoring import sequence_scores
from distalign.methods.base import Batch, Method, as_pairs, pair_batch, rollout_batch


def penalise_unfinished(score: torch.Tensor, ended: torch.Tensor, penalty: float | None):
    """Replace R̂ by −penalty for responses that never emitted EOS (if a penalty is set)."""
    if penalty is None:
        return score
    return torch.where(ended, score, torch.full_like(score, -abs(penalty)))


@torch.no_grad()
def collect_pairs(method: Method, batch: Batch, beta: float, penalty: float | None) -> Batch:
    """Experience ``[B, 2, ...]``: sequences, ln π_t, ln π₀, R̂ and the shaped reward r.
    π_t and π₀ see each prompt once for both samples (packed pairs, ``lm/pairs.py``)."""
    roll = method.sample(batch, 2)  # rows [:B] are first samples, [B:] second ones
    seq = rollout_batch(roll)
    old = method.sampled_pair_logprobs(roll)
    ref = method.ref_pair_logprobs(seq, method.gen.temperature)
    assert method.ctx.reward_model is not None
    score = sequence_scores(method.ctx.reward_model, roll.input_ids, roll.attention_mask,
                            roll.response_mask)
    score = as_pairs(penalise_unfinished(score, roll.ended, penalty))
    exp = pair_batch(seq)
    exp.update(
        old_logp=old, ref_logp=ref, score=score, reward=score - beta * (old - ref),
        ended=as_pairs(roll.ended.float()),
    )
    return exp


def pair_metrics(exp: Batch) -> dict[str, torch.Tensor]:
    kl = (exp["old_logp"] - exp["ref_logp"]).mean()
    return {
        "env/score": exp["score"].mean(),
        "env/kl": kl,
        "env/reward": exp["reward"].mean(),
        "env/ended": exp["ended"].mean(),
        "env/response_tokens": exp["response_mask"].sum(-1).float().mean(),
    }
