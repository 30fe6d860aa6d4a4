"""Per-token shaped rewards for RLHF (1) and reverse KL (15)."""

from __future__ import annotations

import torch
from torch import Tensor

from distalign.objectives.kl import Estimator, kl_penalty


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of a ``[B, T]`` 0/1 mask (0 for an all-zero row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(-1).values


def shaped_rewards(
    score: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    beta: float,
    entropy_coef: float = 0.0,
    estimator: Estimator = "k1",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token rewards r_t for PPO on (1) (``entropy_coef = 0``) or (15) (``entropy_coef = γ``).

    r_t = −β·KL_t(π‖π₀) − γ·ln π(a_t|·) on every response token, plus the sequence score R̂
    on the last real response token (never on padding after EOS). ``logp`` is the sampling
    policy's per-token log-prob, so E_π[Σ_t −ln π(a_t)] = H(π(x)): summed, the shaped
    return is an unbiased estimate of R̂ − β KL(π‖π₀) + γ H(π), the negative of (15).
    """
    mask = mask.to(logp.dtype)
    kl = kl_penalty(logp, ref_logp, estimator) * mask
    neg_logp = -logp * mask
    rewards = -beta * kl + entropy_coef * neg_logp
    last = last_token_index(mask)
    rewards = rewards.scatter_add(-1, last[:, None], score[:, None].to(rewards.dtype))
    return rewards, {
        "env/score": score.detach().mean(),
        "env/kl": kl.sum(-1).detach().mean(),
        "env/entropy": neg_logp.sum(-1).detach().mean(),
        "env/return": rewards.sum(-1).detach().mean(),
    }
