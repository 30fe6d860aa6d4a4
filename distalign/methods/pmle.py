"""PMLE, eqs. (4)–(5): pairwise likelihood with tilt γ, plus β·KL(π‖π₀) on fresh samples.

The preference term uses the offline pairs and has no π₀ inside the sigmoid. The KL term
samples new responses a ∼ π_θ for the batch's prompts and applies the score-function
surrogate of ``objectives.online_kl_surrogate`` (our reading of (5), after HyPO).
With β = 0 (Table 6, and the default) no sampling and no π₀ is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from distalign.methods.base import (
    SEQ_KEYS,
    Batch,
    Method,
    Metrics,
    pair_batch,
    rollout_batch,
)
from distalign.methods.config import AlgoConfig
from distalign.objectives import online_kl_surrogate, pmle_loss

if TYPE_CHECKING:
    from distalign.lm.generation import GenerationConfig


@dataclass
class PMLEConfig(AlgoConfig):
    gamma: float = 1e-2  # γ, the preference tilt of (3)/(4) (Table 5: 1e-2)
    # β, weight of KL(π‖π₀) in (5). Default 0, plain (4) as in Table 6: any β > 0 samples
    # from π (and runs π₀) at every step, and Table 5's 1e-5 buys a negligible KL term for that
    # cost; the TL;DR recipe (configs/paper/tldr/pmle.yaml) sets the paper's 1e-5
    beta: float = 0.0
    kl_samples: int = 1  # fresh responses per prompt for the KL estimate
    kl_baseline: bool = True  # subtract the leave-one-out mean log-ratio (variance reduction)

    RULES = (
        ("gamma", lambda v: v > 0, "> 0"),
        ("beta", lambda v: v >= 0, ">= 0"),
        ("kl_samples", lambda v: v >= 1, ">= 1"),
    )


class PMLE(Method):
    name = "pmle"
    data_kind = "pairs"
    Config = PMLEConfig
    algo: PMLEConfig

    @classmethod
    def needs_reference(cls, algo: PMLEConfig) -> bool:
        return algo.beta > 0

    @classmethod
    def needs_sampler(cls, algo: PMLEConfig) -> bool:
        return algo.beta > 0

    @classmethod
    def generation_config(cls, algo: PMLEConfig, gen: GenerationConfig) -> GenerationConfig:
        # the KL is of π itself, so its samples come from π at temperature 1, unfiltered
        return replace(gen, temperature=1.0, top_k=0, top_p=1.0)

    @torch.no_grad()
    def collect(self, batch: Batch) -> tuple[Batch, Metrics]:
        exp = pair_batch(batch)
        if self.algo.beta > 0:
            roll = self.sample(batch, self.algo.kl_samples)
            k, b = self.algo.kl_samples, batch["prompt_input_ids"].shape[0]
            sample = rollout_batch(roll)
            ref_tok = self.ref_token_logprobs(sample)
            # rows are sample-major; regroup to [B, k, ...] so slicing keeps prompts together
            for key, val in {**sample, "ref_tok": ref_tok}.items():
                exp[f"kl_{key}"] = val.view(k, b, *val.shape[1:]).transpose(0, 1)
        return exp, {}

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        logp_c, logp_r = self.policy_pair_logprobs(exp)
        loss, metrics = pmle_loss(logp_c, logp_r, self.algo.gamma)
        if self.algo.beta > 0:
            flat = {k: exp[f"kl_{k}"].flatten(0, 1) for k in SEQ_KEYS}
            logp = self.policy_token_logprobs(flat)
            kl_loss, kl_metrics = online_kl_surrogate(
                logp,
                exp["kl_ref_tok"].flatten(0, 1),
                flat["response_mask"],
                self.algo.beta,
                baseline=self.algo.kl_baseline,
            )
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> Metrics:
        return pmle_loss(*self.policy_pair_logprobs(pair_batch(batch)), self.algo.gamma)[1]


METHOD = PMLE
