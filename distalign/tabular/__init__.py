"""The exact tabular world of the paper's Figure 1 (arXiv 2506.01523 v2, App. D.1): closed
forms, batched Newton solvers that optimise the ``distalign.objectives`` losses, exact KL
metrics.

>>> from distalign.tabular import ToyConfig, run_toy
>>> res = run_toy(ToyConfig.from_preset("strong", seeds=2, ns=(64, 256), methods=("rlhf", "rkl")))
>>> sorted({r["method"] for r in res.records})
['rkl', 'rlhf']
"""

from distalign.tabular.experiment import PRESETS, ToyConfig, ToyResults, default_betas, run_toy
from distalign.tabular.newton import newton_solve
from distalign.tabular.pairwise import ClosedForm, PairwiseObjective, exact_kl
from distalign.tabular.solvers import (
    METHODS,
    SOLVERS,
    TUNED,
    FitInput,
    distill_policy,
    dpo_policy,
    fit_reward,
    pmle_policy,
    rebel_policy,
    rkl_policy,
    rlhf_policy,
)
from distalign.tabular.world import Pairs, World, make_world, pair_counts, sample_pairs

__all__ = [
    "METHODS",
    "PRESETS",
    "SOLVERS",
    "TUNED",
    "ClosedForm",
    "FitInput",
    "PairwiseObjective",
    "Pairs",
    "ToyConfig",
    "ToyResults",
    "World",
    "default_betas",
    "distill_policy",
    "dpo_policy",
    "exact_kl",
    "fit_reward",
    "make_world",
    "newton_solve",
    "pair_counts",
    "pmle_policy",
    "rebel_policy",
    "rkl_policy",
    "rlhf_policy",
    "run_toy",
    "sample_pairs",
]
