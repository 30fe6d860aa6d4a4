"""Reward modelling: Bradley–Terry NLL (eq. (9)) on a sequence scorer.

The score is read at the last real token of each response (``lm.scoring``), never at a pad.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from distalign.errors import ConfigError
from distalign.lm.scoring import sequence_scores
from distalign.methods.base import Batch, Method, Metrics, as_pairs, from_pairs
from distalign.objectives import bt_reward_loss


@dataclass
class RewardConfig:
    # Centring weight c: adds c·E[(R(a⁺) + R(a⁻))²], pulling the mean reward on the
    # dataset's reference responses towards 0 (BT is invariant to a per-prompt shift, so this
    # only fixes the offset that PPO's value function and whitening would otherwise absorb).
    center_coef: float = 0.0

    def validate(self) -> None:
        if self.center_coef < 0:
            raise ConfigError(f"algo.center_coef must be >= 0, got {self.center_coef}")


class Reward(Method):
    name = "reward"
    data_kind = "pairs"
    Config = RewardConfig
    trains_scorer = True

    @staticmethod
    def collect_pairs(batch: Batch) -> Batch:
        return {k: as_pairs(batch[k]) for k in ("input_ids", "attention_mask", "response_mask")}

    def collect(self, batch: Batch) -> tuple[Batch, Metrics]:
        return self.collect_pairs(batch), {}

    def loss(self, exp: Batch) -> tuple[Tensor, Metrics]:
        flat = {k: from_pairs(v) for k, v in exp.items()}
        scores = sequence_scores(
            self.ctx.policy, flat["input_ids"], flat["attention_mask"], flat["response_mask"]
        )
        b = scores.shape[0] // 2
        loss, metrics = bt_reward_loss(scores[:b], scores[b:])
        if self.algo.center_coef > 0:
            center = ((scores[:b] + scores[b:]) ** 2).mean()
            loss = loss + self.algo.center_coef * center
            metrics["rm/center_penalty"] = center.detach()
        return loss, metrics


METHOD = Reward
