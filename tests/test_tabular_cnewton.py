"""The compiled Newton solver (tabular/fast/compiled.py) against numpy's (tabular/fast/newton.py).

The two take the same steps, so they must reach the same optima on the toy's own problems,
and the |eigenvalue| step for indefinite Hessians must equal LAPACK's eigendecomposition.
"""

from __future__ import annotations

import numpy as np
import pytest

from distalign.tabular.config import ToyConfig
from distalign.tabular.fast import engine as fast
from distalign.tabular.fast import newton as fastnewton
from distalign.tabular.runner import run_toy

cnewton = pytest.importorskip("distalign.tabular.fast.compiled")


def _lapack_abs_step(A: np.ndarray, g: np.ndarray) -> np.ndarray:
    lam, V = np.linalg.eigh(A)
    lam = np.abs(lam)
    lam = np.maximum(lam, 1e-6 * lam.max())
    return -V @ ((V.T @ g) / lam)


@pytest.mark.parametrize("K", [2, 3, 10])
def test_abs_step_equals_lapack_eigh(K: int) -> None:
    """Random symmetric matrices: indefinite, sparse, diagonal, badly scaled, repeated
    eigenvalues; the step −V|Λ|⁻¹Vᵀg agrees with numpy's eigh to 1e-10 (relative)."""
    rng = np.random.default_rng(K)
    worst = 0.0
    for trial in range(300):
        B = rng.normal(size=(K, K)) * rng.choice([1e-4, 1.0, 1e3])
        B = B + B.T
        if trial % 3 == 0:
            B[rng.random((K, K)) < 0.5] = 0.0
            B = np.triu(B) + np.triu(B, 1).T
        if trial % 5 == 0:
            B = np.diag(np.diag(B))
        if trial % 7 == 0:  # a repeated eigenvalue
            Q, _ = np.linalg.qr(rng.normal(size=(K, K)))
            B = Q @ np.diag(np.r_[np.full(K - 1, -2.0), 3.0]) @ Q.T
        if not np.abs(B).max() > 0:  # the solver's matrices carry the shift scale·11ᵀ/K
            continue
        g = rng.normal(size=K)
        step = cnewton.abs_step(B, g)
        want = _lapack_abs_step(B, g)
        assert np.isfinite(want).all()
        worst = max(worst, np.abs(step - want).max() / np.abs(want).max())
    assert worst <= 1e-10, worst


@pytest.fixture(scope="module")
def grid() -> fast.Grid:
    return fast.Grid(ToyConfig.from_preset("paper", seeds=2, ns=(32, 256, 4096)))


@pytest.mark.parametrize("method", ["pmle", "distill"])
def test_compiled_solver_reaches_numpys_optima(grid: fast.Grid, method: str) -> None:
    obj, theta0 = fast.problems(grid, method)
    want_status = np.empty(theta0.shape[1], dtype=np.int8)
    want, _ = fastnewton.solve(obj, theta0, status=want_status)
    got, status = cnewton.solve(obj, theta0, threads=2, chunk=257)
    centred = np.abs((got - got.mean(0)) - (want - want.mean(0))).max(0)
    # the same steps in a different summation order: equal to rounding, amplified only where
    # the objective is flat (n = 32: logits running off along unpaired directions)
    assert np.median(centred) <= 1e-12
    assert centred.max() <= 1e-6, centred.max()
    assert (status == want_status).mean() >= 0.999
    values = cnewton.values(obj, got)
    assert np.allclose(values, obj.at(np.arange(got.shape[1])).value(got), rtol=0, atol=1e-12)


def test_numpy_fallback_gives_the_same_records(monkeypatch) -> None:
    """Without the extension (DISTALIGN_TOY_COMPILED=0) the toy runs numpy's solver: the
    same records."""
    cfg = ToyConfig.from_preset("paper", seeds=2, ns=(32, 1024), threads=1)
    compiled = run_toy(cfg).records
    monkeypatch.setenv("DISTALIGN_TOY_COMPILED", "0")
    assert fast._compiled() is None
    plain = run_toy(cfg).records
    for a, b in zip(compiled, plain, strict=True):
        assert a.keys() == b.keys()
        for key, value in b.items():
            if isinstance(value, float):
                assert abs(a[key] - value) <= 1e-6 * max(1.0, abs(value)), (b, key, a[key])
            else:
                assert a[key] == value


def test_the_toy_command_says_which_solver_ran(tmp_path, monkeypatch, capsys) -> None:
    """results.json names the solver, and a run without the extension says so."""
    from distalign.cli import main
    from distalign.tabular.report import load_results

    args = ["toy", "--seeds", "1", "--ns", "16,64", "--methods", "pmle"]
    main([*args, "--out", str(tmp_path / "c")])
    assert load_results(tmp_path / "c" / "results.json").solver == "compiled"
    assert "not built" not in capsys.readouterr().out
    monkeypatch.setenv("DISTALIGN_TOY_COMPILED", "0")
    main([*args, "--out", str(tmp_path / "n")])
    assert load_results(tmp_path / "n" / "results.json").solver == "numpy"
    assert "not built" in " ".join(capsys.readouterr().out.split())

