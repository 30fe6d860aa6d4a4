"""GAE and PPO's clipped policy and value losses: the optimiser of RLHF (1) and reverse KL (15),
with the settings of the paper's Table 5 (GAE λ, clip, value coefficient)."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked entries (advantage
    whitening); masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, discount: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over ``[B, T]`` token rewards and values.

    δ_t = r_t + discount·V_{t+1} − V_t,  A_t = δ_t + discount·λ·A_{t+1}; the value after the
    last real token is 0. Masked positions get zero advantage. Returns (advantages, returns).
    """
    mask = mask.to(rewards.dtype)
    values = values * mask
    T = rewards.shape[-1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        # a masked-out next position (after EOS) contributes no value and no carried advantage
        nm = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + discount * next_v * nm - values[:, t]
        last = (delta + discount * lam * last * nm) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1±ε))."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
    return loss, {
        "loss/policy": loss.detach(),
        "ppo/approx_kl": approx_kl,
        "ppo/clipfrac": clipfrac,
        "ppo/ratio": masked_mean(ratio.detach(), mask),
    }


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: ½ · mean max((V − G)², (V_old + clip(V − V_old, ±ε) − G)²)."""
    mask = mask.to(values.dtype)
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    loss = 0.5 * masked_mean(err, mask)
    return loss, {
        "loss/value": loss.detach(),
        "ppo/value_clipfrac": masked_mean(
            ((values - returns) ** 2 < (v_clipped - returns) ** 2).to(values.dtype), mask
        ).detach(),
    }
