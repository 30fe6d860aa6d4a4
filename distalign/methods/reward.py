"""Reward modelling: Bradley–Terry NLL (eq. (9)) on a sequence scorer.

The score is read at the last real token of each response (``lm.scoring``), never at a pad.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from distalign.lm.scoring import sequence_scores
from distalign.methods.base import Batch, Method, Metrics, flat_pairs, pair_batch, split_pairs
from distalign.methods.config import AlgoConfig
from distalign.objectives import bt_reward_loss


@dataclass
class RewardConfig(AlgoConfig):
    # Centring weight c: adds c·E[(R(a⁺) + R(a⁻))²], pulling the mean reward on the
    # dataset's reference responses towards 0 (BT is invariant to a per-prompt shift, so this
    # only fixes the offset that PPO's value function and whitening would otherwise absorb).
    center_coef: float = 0.0

    RULES = (("center_coef", lambda v: v >= 0, ">= 0"),)


class Reward(Method):
    name = "reward"
    data_kind = "pairs"
    Config = RewardConfig
    algo: RewardConfig
    trains_scorer = True

    def collect(self, batch: Batch) -> tuple[Batch, Metrics]:
        return pair_batch(batch), {}

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        flat = flat_pairs(exp)
        scores = sequence_scores(
            self.ctx.policy, flat["input_ids"], flat["attention_mask"], flat["response_mask"]
        )
        chosen, rejected = split_pairs(scores)
        loss, metrics = bt_reward_loss(chosen, rejected)
        if self.algo.center_coef > 0:
            center = ((chosen + rejected) ** 2).mean()
            loss = loss + self.algo.center_coef * center
            metrics["rm/center_penalty"] = center.detach()
        return loss, metrics


METHOD = Reward
