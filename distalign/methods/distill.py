"""Preference distillation, eqs. (11)–(12) and Algorithm 1.

On each step two responses per prompt are sampled from π_t (as REBEL does; §4 of the paper), the
frozen reward model gives soft targets p̃ = σ(r(a1) − r(a2)) with the KL-shaped reward
r = R̂ − β(ln π_t − ln π₀) (our reading of how β enters (12); the paper does not spell it
out), and the policy's preference probability σ(γ (ln π_θ(a1) − ln π_θ(a2))) is fitted to p̃
by KL(Bern ‖ Bern).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distalign.lm.pairs import pair_sequence_logprobs
from distalign.methods.base import Batch, Method, Metrics
from distalign.methods.config import AlgoConfig
from distalign.methods.online import collect_pairs, pair_metrics
from distalign.objectives import distill_loss


@dataclass
class DistillConfig(AlgoConfig):
    gamma: float = 0.1  # γ, preference tilt in σ(γ Δ ln π) (Table 5: 0.1)
    beta: float = 0.05  # β, KL-to-π₀ weight of (12), folded into the reward
    update_epochs: int = 4
    missing_eos_penalty: float | None = None

    RULES = (("gamma", lambda v: v > 0, "> 0"), ("beta", lambda v: v >= 0, ">= 0"))


class Distill(Method):
    name = "distill"
    data_kind = "prompts"
    Config = DistillConfig
    algo: DistillConfig
    uses_reference = True
    uses_reward_model = True

    @classmethod
    def needs_reference(cls, algo: DistillConfig) -> bool:
        return algo.beta > 0

    def ref_pair_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        if self.ctx.ref is None:  # β = 0: the KL shaping term vanishes
            return pair_sequence_logprobs(self.ctx.policy, batch, temperature)
        return super().ref_pair_logprobs(batch, temperature)

    @torch.no_grad()
    def collect(self, batch: Batch) -> tuple[Batch, Metrics]:
        exp = collect_pairs(self, batch, self.algo.beta, self.algo.missing_eos_penalty)
        exp["target"] = torch.sigmoid(exp["reward"][:, 0] - exp["reward"][:, 1])
        return exp, pair_metrics(exp)

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        # π_θ at temperature 1: the preference model (3) is about π itself
        logp_1, logp_2 = self.policy_pair_logprobs(exp)
        return distill_loss(logp_1, logp_2, exp["target"], self.algo.gamma)

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> Metrics:
        return self.collect(batch)[1]  # the samples' scores; no loss on held-out prompts


METHOD = Distill
