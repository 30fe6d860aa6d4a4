"""``run_toy`` and ``grid_metrics``: the numpy engine (:mod:`.fast`) on the CPU, the torch
reference (:mod:`.reference`) elsewhere or when asked for.

Importing this module imports neither torch nor the torch engine, so ``distalign toy`` on the
CPU starts in a fraction of a second (``import torch`` alone takes about 1.3 s).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distalign.tabular.config import ToyConfig, ToyResults


def run_toy(
    config: ToyConfig, progress: Callable[[str, int], None] | None = None
) -> ToyResults:
    """Run the experiment; ``progress(method, n)`` is called for every (method, n) solved."""
    config.validate()
    if config.solver_engine == "numpy":
        from distalign.tabular.fast import engine

        return engine.run(config, progress)
    from distalign.tabular.reference import experiment

    return experiment.run_torch(config, progress)


def grid_metrics(config: ToyConfig, methods: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Forward KL (full fit) and held-out log-likelihood (train fit) at every β, ``[S, B]``
    each, by method and n: the curves the oracle and honest choices pick from (torch
    tensors, whichever engine solved them)."""
    config.validate()
    if config.solver_engine == "numpy":
        import torch

        from distalign.tabular.fast import engine

        return {m: {n: (torch.from_numpy(f), torch.from_numpy(v)) for n, (f, v) in by_n.items()}
                for m, by_n in engine.grid_metrics(config, methods).items()}
    from distalign.tabular.reference import experiment

    return experiment.grid_metrics_torch(config, methods)
