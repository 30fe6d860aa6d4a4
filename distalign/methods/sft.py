"""Supervised fine-tuning: token-level negative log-likelihood of the completion."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from distalign.methods.base import Batch, Method, Metrics
from distalign.methods.config import AlgoConfig


@dataclass
class SFTConfig(AlgoConfig):
    """SFT has no hyper-parameters of its own; the optimiser and data settings cover it."""


class SFT(Method):
    name = "sft"
    data_kind = "sft"
    Config = SFTConfig

    def units(self, exp: Batch) -> float:
        # token-level mean: weight micro-batches by their completion tokens
        return float(exp["response_mask"].sum())

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        mask = exp["response_mask"].float()
        nll = -(self.policy_token_logprobs(exp) * mask).sum() / mask.sum().clamp_min(1.0)
        return nll, {"loss/nll": nll.detach(), "sft/tokens": mask.sum()}


METHOD = SFT
