"""Pairwise objectives on sequence log-probabilities: (4) PMLE, (6) DPO, (9) BT reward,
(10) REBEL and (11) preference distillation.

All inputs are tensors of equal shape (usually ``[B]``); losses are means over that shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]


def _mean(x: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return x.mean()
    return (x * weight).sum() / weight.sum().clamp_min(1e-12)


def preference_logprob(logp_a: Tensor, logp_b: Tensor, gamma: float) -> Tensor:
    """ln P_π(a ≻ b | x) = ln σ(γ · (ln π(a|x) − ln π(b|x))), eq. (3)."""
    return F.logsigmoid(gamma * (logp_a - logp_b))


def pmle_loss(
    logp_chosen: Tensor, logp_rejected: Tensor, gamma: float, weight: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """PMLE, eq. (4): mean of −ln σ(γ · ln[π(a⁺|x)/π(a⁻|x)]).

    Unlike DPO there is no π₀ inside the sigmoid; γ is the preference tilt.
    """
    margin = gamma * (logp_chosen - logp_rejected)
    loss = _mean(-F.logsigmoid(margin), weight)
    return loss, {
        "loss/pref": loss.detach(),
        "pref/margin": margin.detach().mean(),
        "pref/accuracy": (margin > 0).float().mean().detach(),
    }


def dpo_loss(
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    gamma: float,
    weight: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """DPO as the paper writes it, eq. (6).

    −ln σ(γ ln[π(a⁺)/π(a⁻)] − γ ln[π₀(a⁺)/π₀(a⁻)]). Tables 5/6 call this γ "β: 0.05"
    (the usual DPO temperature); it is *not* a KL-to-π₀ weight.
    """
    chosen_reward = gamma * (logp_chosen - ref_chosen)
    rejected_reward = gamma * (logp_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = _mean(-F.logsigmoid(margin), weight)
    return loss, {
        "loss/pref": loss.detach(),
        "rewards/chosen": chosen_reward.detach().mean(),
        "rewards/rejected": rejected_reward.detach().mean(),
        "rewards/margin": margin.detach().mean(),
        "rewards/accuracy": (margin > 0).float().mean().detach(),
    }


def bt_reward_loss(
    r_chosen: Tensor, r_rejected: Tensor, weight: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """Bradley–Terry reward-model NLL, eq. (9): mean of −ln σ(R(x,a⁺) − R(x,a⁻))."""
    margin = r_chosen - r_rejected
    loss = _mean(-F.logsigmoid(margin), weight)
    return loss, {
        "loss/bt": loss.detach(),
        "rm/margin": margin.detach().mean(),
        "rm/accuracy": (margin > 0).float().mean().detach(),
        "rm/chosen": r_chosen.detach().mean(),
        "rm/rejected": r_rejected.detach().mean(),
    }


def rebel_loss(
    logp_1: Tensor,
    logp_2: Tensor,
    base_1: Tensor,
    base_2: Tensor,
    reward_1: Tensor,
    reward_2: Tensor,
    eta: float,
) -> tuple[Tensor, Metrics]:
    """REBEL squared regression, eq. (10).

    mean of ( ln[π(a1)/base(a1)] − ln[π(a2)/base(a2)] − η (R̂(a1) − R̂(a2)) )².
    With ``base = π₀`` this is the paper's form; with ``base = π_t`` (the sampling policy,
    detached) it is the form used in REBEL's code. The caller picks the base.
    """
    pred = (logp_1 - base_1) - (logp_2 - base_2)
    target = eta * (reward_1 - reward_2)
    err = pred - target
    loss = (err**2).mean()
    return loss, {
        "loss/rebel": loss.detach(),
        "rebel/pred": pred.detach().mean(),
        "rebel/target_abs": target.detach().abs().mean(),
        "rebel/abs_error": err.detach().abs().mean(),
    }


def distill_loss(
    logp_1: Tensor, logp_2: Tensor, target_prob: Tensor, gamma: float
) -> tuple[Tensor, Metrics]:
    """Preference distillation, eq. (11), in soft-label cross-entropy form.

    Per pair: KL(Bern(p̃) ‖ Bern(p_π)) with p̃ = σ(R̂(a1) − R̂(a2)) (``target_prob``) and
    p_π = σ(γ (ln π(a1) − ln π(a2))). We return the KL itself (cross-entropy minus the
    constant entropy of p̃), so the optimum value is 0 and it is symmetric in (a1, a2).
    """
    z = gamma * (logp_1 - logp_2)
    p = target_prob.clamp(1e-7, 1 - 1e-7)
    ce = -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))
    ent = -(p * p.log() + (1 - p) * (1 - p).log())
    loss = (ce - ent).mean()
    return loss, {
        "loss/distill": loss.detach(),
        "distill/target_prob": target_prob.detach().mean(),
        "distill/model_prob": torch.sigmoid(z).detach().mean(),
        "distill/abs_gap": (torch.sigmoid(z) - target_prob).detach().abs().mean(),
    }
