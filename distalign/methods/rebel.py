"""REBEL, eq. (10): regress the policy's log-ratio gap onto η times the reward gap.

Two responses per prompt are sampled from π_t and scored (``online.collect_pairs``). The
log-ratio is taken relative to π_t (``form="pi_t"``, as REBEL's code does) or to π₀
(``form="pi_0"``, as the paper writes (10)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distalign.methods.base import Batch, Method, Metrics
from distalign.methods.config import AlgoConfig
from distalign.methods.online import collect_pairs, pair_metrics
from distalign.objectives import rebel_loss


@dataclass
class REBELConfig(AlgoConfig):
    eta: float = 1.0  # η, reward scale in (10) (Table 5: 1.0; Table 6: 1e6)
    beta: float = 0.05  # β, "kl coefficient": r = R̂ − β(ln π_t − ln π₀)
    form: str = "pi_t"  # pi_t (REBEL code) | pi_0 (paper's (10))
    update_epochs: int = 4  # passes over each batch of samples (Table 5: 4)
    missing_eos_penalty: float | None = None  # R̂ := −penalty for responses without EOS

    RULES = (("eta", lambda v: v > 0, "> 0"),)
    CHOICES = (("form", ("pi_t", "pi_0")),)


class REBEL(Method):
    name = "rebel"
    data_kind = "prompts"
    Config = REBELConfig
    algo: REBELConfig
    uses_reference = True
    uses_reward_model = True

    @torch.no_grad()
    def collect(self, batch: Batch) -> tuple[Batch, Metrics]:
        exp = collect_pairs(self, batch, self.algo.beta, self.algo.missing_eos_penalty)
        return exp, pair_metrics(exp)

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        logp_1, logp_2 = self.policy_pair_logprobs(exp, self.gen.temperature)
        base = exp["old_logp"] if self.algo.form == "pi_t" else exp["ref_logp"]
        r = exp["reward"]
        loss, metrics = rebel_loss(
            logp_1, logp_2, base[:, 0], base[:, 1], r[:, 0], r[:, 1], self.algo.eta
        )
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> Metrics:
        return self.collect(batch)[1]  # the samples' scores; no loss on held-out prompts


METHOD = REBEL
