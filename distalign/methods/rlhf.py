"""RLHF with PPO, eq. (1) (defaults: Table 5).

Collect: one response per prompt from π_t; R̂ from the frozen reward model on the last real
token; per-token −β·KL(π_t‖π₀) (k1 by default) on every response token; values from the
value model; GAE; whitened advantages. Update: PPO clipped policy loss + vf_coef × clipped
value loss, for ``update_epochs`` passes over shuffled mini-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distalign.lm.scoring import sequence_scores, token_scores
from distalign.methods.base import Batch, Method, Metrics
from distalign.methods.config import AlgoConfig
from distalign.methods.online import penalise_unfinished
from distalign.objectives import gae, ppo_policy_loss, ppo_value_loss, shaped_rewards, whiten


@dataclass
class RLHFConfig(AlgoConfig):
    beta: float = 0.05  # β, "kl coefficient": per-token −β·KL(π‖π₀) in the reward
    kl_estimator: str = "k1"  # k1 | k3
    update_epochs: int = 4  # PPO epochs over each batch of rollouts (Table 5: 4)
    clip_range: float = 0.2  # PPO ε for the policy ratio
    value_clip: float = 0.2  # clip of V around its rollout value
    vf_coef: float = 0.1
    gae_lambda: float = 0.95
    discount: float = 1.0
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None  # R̂ := −penalty for responses without EOS

    RULES = (
        ("beta", lambda v: v >= 0, ">= 0"),
        ("gae_lambda", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("discount", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("clip_range", lambda v: v > 0, "> 0"),
        ("value_clip", lambda v: v >= 0, ">= 0"),
        ("vf_coef", lambda v: v >= 0, ">= 0"),
    )
    CHOICES = (("kl_estimator", ("k1", "k3")),)

    @property
    def entropy_coef(self) -> float:
        return 0.0


def state_values(value_model: torch.nn.Module, ids: Tensor, attn: Tensor) -> Tensor:
    """V(s_t) for the state *before* token t: the head's output at position t−1."""
    return F.pad(token_scores(value_model, ids, attn)[:, :-1], (1, 0))


class RLHF(Method):
    name = "rlhf"
    data_kind = "prompts"
    Config = RLHFConfig
    algo: RLHFConfig
    uses_reference = True
    uses_reward_model = True
    uses_value_model = True

    def units(self, exp: Batch) -> float:
        return float(exp["response_mask"][:, exp["prompt_length"][0] :].sum())

    @torch.no_grad()
    def collect(self, batch: Batch) -> tuple[Batch, Metrics]:
        a, temp = self.algo, self.gen.temperature
        roll = self.sample(batch, 1)
        seq = {"input_ids": roll.input_ids, "attention_mask": roll.attention_mask}
        p = roll.prompt_length
        mask = roll.response_mask[:, p:].float()
        logp = self.sampled_token_logprobs(roll)
        # the response mask restricts π₀'s LM head to response positions (0 elsewhere)
        ref = self.ref_token_logprobs({**seq, "response_mask": roll.response_mask}, temp)[:, p:]
        assert self.ctx.reward_model is not None and self.ctx.value_model is not None
        score = sequence_scores(
            self.ctx.reward_model, roll.input_ids, roll.attention_mask, roll.response_mask
        )
        score = penalise_unfinished(score, roll.ended, a.missing_eos_penalty)
        values = state_values(self.ctx.value_model, roll.input_ids, roll.attention_mask)[:, p:]
        rewards, env = shaped_rewards(
            score, logp, ref, mask, a.beta, a.entropy_coef, a.kl_estimator
        )
        adv, returns = gae(rewards, values, mask, a.discount, a.gae_lambda)
        if a.whiten_advantages:
            adv = whiten(adv, mask)
        metrics = {**env, "env/ended": roll.ended.float().mean(),
                   "env/response_tokens": mask.sum(-1).mean()}
        n = roll.input_ids.shape[0]
        return {
            **seq, "response_mask": roll.response_mask,
            "prompt_length": torch.full((n,), p, device=mask.device),
            "old_logp": logp, "old_values": values * mask, "advantages": adv,
            "returns": returns,
        }, metrics

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        p = int(exp["prompt_length"][0])
        mask = exp["response_mask"][:, p:].float()
        logp = self.policy_token_logprobs(exp, self.gen.temperature)[:, p:]
        assert self.ctx.value_model is not None
        values = state_values(self.ctx.value_model, exp["input_ids"], exp["attention_mask"])
        pg, m1 = ppo_policy_loss(logp, exp["old_logp"], exp["advantages"], mask,
                                 self.algo.clip_range)
        vf, m2 = ppo_value_loss(values[:, p:], exp["old_values"], exp["returns"], mask,
                                self.algo.value_clip)
        return pg + self.algo.vf_coef * vf, {**m1, **m2}

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> Metrics:
        return self.collect(batch)[1]  # the samples' rewards and KL; no loss on held-out data


METHOD = RLHF
