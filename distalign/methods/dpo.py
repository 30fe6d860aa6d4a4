"""DPO, eq. (6): offline pairs, π₀ inside the sigmoid, temperature γ."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distalign.errors import ConfigError
from distalign.lm.pairs import pair_sequence_logprobs
from distalign.methods.base import Batch, Method, Metrics, as_pairs, from_pairs
from distalign.objectives import dpo_loss

PAIR_KEYS = ("input_ids", "attention_mask", "response_mask")


@dataclass
class DPOConfig:
    gamma: float = 0.05  # γ in (6); the "β: 0.05" of Tables 5/6 (DPO temperature)
    # compute π₀'s log-probs once over the dataset before training (no π₀ forward per step)
    precompute_ref: bool = False

    def validate(self) -> None:
        if self.gamma <= 0:
            raise ConfigError(f"algo.gamma must be > 0, got {self.gamma}")


def pair_experience(method: Method, batch: Batch) -> Batch:
    """Pairs as ``[B, 2, ...]`` plus π₀'s sequence log-probs (precomputed or computed now)."""
    exp = {k: as_pairs(batch[k]) for k in PAIR_KEYS}
    if "ref_logp" in batch:
        exp["ref_logp"] = batch["ref_logp"]
    else:
        assert method.ctx.ref is not None, f"{method.name} needs a reference model"
        exp["ref_logp"] = method.ctx.ref.pair_logprobs(method.ctx.policy, batch)
    return exp


def pair_logprobs(method: Method, exp: Batch) -> tuple[Tensor, Tensor]:
    """Policy sequence log-probs of (chosen, rejected) from one stacked forward."""
    flat = {k: from_pairs(exp[k]) for k in PAIR_KEYS}
    logp = pair_sequence_logprobs(method.ctx.policy, flat)
    return logp[:, 0], logp[:, 1]


class DPO(Method):
    name = "dpo"
    data_kind = "pairs"
    Config = DPOConfig
    uses_reference = True

    @torch.no_grad()
    def collect(self, batch: Batch) -> tuple[Batch, Metrics]:
        return pair_experience(self, batch), {}

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        logp_c, logp_r = pair_logprobs(self, exp)
        ref = exp["ref_logp"]
        return dpo_loss(logp_c, logp_r, ref[:, 0], ref[:, 1], self.algo.gamma)


METHOD = DPO
