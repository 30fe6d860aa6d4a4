"""The exact tabular world of the paper's Figure 1 (arXiv 2506.01523 v2, App. D.1): closed
forms, batched Newton solvers that optimise the ``distalign.objectives`` losses, exact KL
metrics.

Shared by both engines: :mod:`.config` (settings, results, summaries), :mod:`.world` (the one
sampler), :mod:`.rules` (Newton's constants), :mod:`.runner` (``run_toy``) and :mod:`.report`.
The engines: :mod:`.fast` (numpy and C, the default on the CPU) and :mod:`.reference` (torch,
on the library's losses; any device).

>>> from distalign.tabular import ToyConfig, run_toy
>>> res = run_toy(ToyConfig.from_preset("strong", seeds=2, ns=(64, 256), methods=("rlhf", "rkl")))
>>> sorted({r["method"] for r in res.records})
['rkl', 'rlhf']

Names are imported on first use (PEP 562): ``ToyConfig`` and ``run_toy`` need numpy only, so
``distalign toy`` on the CPU never imports torch; the torch reference loads when first named.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "config": ("PRESETS", "ToyConfig", "ToyResults", "default_betas", "METHODS"),
    "runner": ("run_toy",),
    "reference.newton": ("newton_solve",),
    "reference.pairwise": ("ClosedForm", "PairwiseObjective", "exact_kl"),
    "reference.solvers": ("SOLVERS", "TUNED", "FitInput", "distill_policy", "dpo_policy",
                          "fit_reward", "pmle_policy", "rebel_policy", "rkl_policy",
                          "rlhf_policy"),
    "world": ("Pairs", "TorchRandom", "World", "make_world", "pair_counts", "sample_pairs"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    else:  # a submodule, e.g. ``from distalign.tabular import solvers``
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
