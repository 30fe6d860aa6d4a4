"""KL-to-π₀ estimators on sampled tokens (used by (1), (5), (12), (15))."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Estimator = Literal["k1", "k3"]


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: Estimator = "k1") -> Tensor:
    """Per-token estimate of KL(π‖π₀) from tokens sampled from π.

    k1 = ln π − ln π₀ (unbiased, can be negative); k3 = (r − 1) − ln r with r = π₀/π
    (unbiased and ≥ 0, lower variance; Schulman's estimator).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (expected 'k1' or 'k3')")


def online_kl_surrogate(
    logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float, baseline: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """Score-function surrogate for β·KL(π‖π₀) in PMLE's eq. (5).

    ``logp``/``ref_logp`` are per-token log-probs ``[B, T]`` of fresh samples a ∼ π_θ and
    ``mask`` marks their response tokens. With s(a) = ln π_θ(a) − ln π₀(a) (sequence level)
    the gradient of E_π[s] is E_π[(s − b) ∇ ln π_θ(a)] for any b independent of a (the
    E[∇ ln π] term is zero), so the surrogate is β · mean( stopgrad(s − b) · ln π_θ(a) ).
    With ``baseline``, b is the leave-one-out mean of the *other* samples' s, which keeps the
    estimate unbiased (a plain batch mean would include a itself and shrink the expected
    gradient by 1 − 1/B). The surrogate's *value* is not the KL; the KL estimate is reported
    in the metrics.
    """
    seq_logp = (logp * mask).sum(-1)
    s = ((logp - ref_logp) * mask).sum(-1).detach()
    n = s.numel()
    adv = s - (s.sum() - s) / (n - 1) if baseline and n > 1 else s
    loss = beta * (adv * seq_logp).mean()
    return loss, {"kl/online": s.mean(), "loss/kl_surrogate": loss.detach()}
