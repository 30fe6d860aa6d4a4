"""Pure tensor objectives of arXiv 2506.01523 v2 (each docstring cites its equation number).
No models, no I/O, no globals.

Every function returns ``(loss, metrics)`` where ``metrics`` maps names to detached
scalar tensors. Sequence log-probabilities are sums of token log-probs over the response.
"""

from distalign.objectives.kl import kl_penalty, online_kl_surrogate
from distalign.objectives.ppo import gae, ppo_policy_loss, ppo_value_loss, whiten
from distalign.objectives.preference import (
    bt_reward_loss,
    distill_loss,
    dpo_loss,
    pmle_loss,
    preference_logprob,
    rebel_loss,
)
from distalign.objectives.rewards import shaped_rewards

__all__ = [
    "bt_reward_loss",
    "distill_loss",
    "dpo_loss",
    "gae",
    "kl_penalty",
    "online_kl_surrogate",
    "pmle_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_logprob",
    "rebel_loss",
    "shaped_rewards",
    "whiten",
]
