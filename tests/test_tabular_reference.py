"""The toy's results equal those of the solver before the speed work (to 1e-6).

``fixtures/tabular_reference.json`` was written by the two-start solver of commit 7fa6ef0 (the
code before the speed work) on a sub-grid of the paper preset: 2 seeds, n = 32 (every
context nearly empty, the non-convex corner cases), 256 and 8192, all six methods and the
full 41-value β grid. It holds every record and, for the four iterative methods, the forward
KL of the full-data fit and the held-out log-likelihood of the train fit at every β.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distalign.tabular import ToyConfig, run_toy
from distalign.tabular.runner import grid_metrics

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "tabular_reference.json"
TOL = 1e-6


def _close(a: float, b: float) -> bool:
    """Equal to 1e-6, relative for values above 1 (forward KLs of collapsed fits reach 1e3)."""
    return abs(a - b) <= TOL * max(1.0, abs(b))


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def config(reference: dict) -> ToyConfig:
    ref = reference["config"]
    return ToyConfig.from_preset(ref["preset"], seeds=ref["seeds"], ns=tuple(ref["ns"]))


def test_records_match_the_reference_solver(reference: dict, config: ToyConfig) -> None:
    records = run_toy(config).records
    assert len(records) == len(reference["records"])
    bad = []
    for new, old in zip(records, reference["records"], strict=True):
        assert (new["method"], new["n"], new["seed"]) == (old["method"], old["n"], old["seed"])
        bad += [(old["method"], old["n"], old["seed"], key, old[key], new[key])
                for key in old if isinstance(old[key], float) and not _close(new[key], old[key])]
    assert not bad, bad[:5]


def test_every_beta_matches_the_reference_solver(reference: dict, config: ToyConfig) -> None:
    """Not only the chosen β: the whole curve over the grid, for both fits."""
    metrics = grid_metrics(config, methods=tuple(reference["per_beta"]))
    for method, by_n in reference["per_beta"].items():
        for n, want in by_n.items():
            fkl, val = metrics[method][int(n)]
            for key, got in (("fkl", fkl), ("val_loglik", val)):
                old = torch.tensor(want[key], dtype=torch.float64)
                err = (got - old).abs() / old.abs().clamp_min(1.0)
                assert float(err.max()) <= TOL, (method, n, key, float(err.max()))
