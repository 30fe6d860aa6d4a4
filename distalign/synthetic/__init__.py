"""A ground-truth language world: known π*, enumerable responses, exact metrics.

>>> from distalign.synthetic import build_world
>>> world = build_world()
>>> world.num_prompts, world.num_responses
(9, 39)
"""

from distalign.synthetic.labels import PairSet, bt_probability, preference_loglik, sample_pairs
from distalign.synthetic.light import LightRewardModel, light_reward_model
from distalign.synthetic.lm import world_policy, world_tokenizer
from distalign.synthetic.metrics import (
    ExactEvaluator,
    ExactMetricsCallback,
    exact_metrics,
    reward_metrics,
    rlhf_floor,
)
from distalign.synthetic.world import World, WorldConfig, build_world

__all__ = [
    "ExactEvaluator",
    "ExactMetricsCallback",
    "LightRewardModel",
    "PairSet",
    "World",
    "WorldConfig",
    "build_world",
    "bt_probability",
    "exact_metrics",
    "light_reward_model",
    "preference_loglik",
    "reward_metrics",
    "rlhf_floor",
    "sample_pairs",
    "world_policy",
    "world_tokenizer",
]
