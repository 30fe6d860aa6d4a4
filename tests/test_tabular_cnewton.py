"""The compiled Newton solver (tabular/fast/compiled.py) against numpy's (tabular/fast/newton.py).

The two take the same steps, so they must reach the same optima on the toy's own problems,
and the |eigenvalue| step for indefinite Hessians must equal LAPACK's eigendecomposition. The
ctypes side must match the C header, a stale or broken extension must fall back to numpy's
solver, and every error code of the C functions must surface.
"""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import distalign.tabular.fast
from distalign.tabular import rules
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


# ---------------------------------------------------------------------- the C interface
def _header() -> str:
    """_newton.h without its comments."""
    text = Path(cnewton.__file__).with_name("_newton.h").read_text()
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def test_the_ctypes_side_is_the_headers() -> None:
    """compiled.py's copy of _newton.h: ABI version, every function's parameter types, the
    rules struct field by field (and rules.py behind it), the return and status codes."""
    text = _header()
    assert int(re.search(r"#define DISTALIGN_NEWTON_ABI (\d+)", text)[1]) == cnewton.ABI_VERSION
    protos = {m[1]: m[2] for m in re.finditer(r"\bint (\w+)\(([^)]*)\);", text)}
    for name, params in cnewton.SIGNATURES.items():
        decls = [" ".join(p.split()) for p in protos[name].split(",")]
        types = () if decls == ["void"] else tuple(re.sub(r"\s*\w+$", "", d) for d in decls)
        assert types == params, name
    body = re.search(r"typedef struct \{(.*?)\} newton_rules;", text, re.S)[1]
    fields = [(name.strip(), decl.split()[0]) for decl in body.split(";") if decl.strip()
              for name in decl.split(None, 1)[1].split(",")]
    c_name = {ctypes.c_int: "int", ctypes.c_double: "double"}
    assert fields == [(name, c_name[t]) for name, t in cnewton.Rules._fields_]
    c = cnewton.c_rules()
    assert all(getattr(c, name) == getattr(rules, name.upper()) for name, _ in fields)
    codes = {k: int(v) for k, v in re.findall(r"\b(NEWTON_\w+) = (\d+)", text)}
    assert [codes[f"NEWTON_{k}"] for k in ("OK", "NO_MEMORY", "NO_EIGEN")] == [
        cnewton.OK, cnewton.NO_MEMORY, cnewton.NO_EIGEN]
    for k in ("CONVERGED", "STALLED", "UNCONVERGED", "FAILED"):
        assert codes[f"NEWTON_{k}"] == getattr(rules, k)


class _Fn:
    """A C function that returns ``value`` (and takes ctypes' argtypes and restype)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self, *args: object) -> int:
        return self.value


class _StaleLib:
    """What ctypes.CDLL gives for an extension built from other sources: another ABI version,
    or a function missing (ctypes raises AttributeError for it)."""

    def __init__(self, abi: int, missing: str = "") -> None:
        for name in cnewton.SIGNATURES:
            if name != missing:
                setattr(self, name, _Fn(0))
        if missing != "distalign_newton_abi":
            self.distalign_newton_abi = _Fn(abi)
        if missing != "newton_rules_bytes":
            self.newton_rules_bytes = _Fn(ctypes.sizeof(cnewton.Rules))


@pytest.fixture
def load_stale(monkeypatch: pytest.MonkeyPatch):
    """Import compiled.py afresh, as the engine does, with ctypes loading a stale library."""

    def load(lib: _StaleLib) -> object:
        monkeypatch.setattr(ctypes, "CDLL", lambda path: lib)
        monkeypatch.delitem(sys.modules, "distalign.tabular.fast.compiled")
        monkeypatch.delattr(distalign.tabular.fast, "compiled")
        fast._load_compiled.cache_clear()
        return fast._compiled()

    yield load
    fast._load_compiled.cache_clear()


def test_an_extension_of_another_abi_falls_back_to_numpy_with_one_line(load_stale, capsys
                                                                       ) -> None:
    assert load_stale(_StaleLib(abi=cnewton.ABI_VERSION - 1)) is None
    assert fast._compiled() is None  # decided once: neither retried nor repeated
    cfg = ToyConfig.from_preset("paper", seeds=1, ns=(16, 64), methods=("pmle",), threads=1)
    assert run_toy(cfg).solver == "numpy"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"ABI version {cnewton.ABI_VERSION - 1}" in err[0] and "numpy" in err[0]


@pytest.mark.parametrize("missing", ["solve_range", "distalign_newton_abi"])
def test_an_extension_without_a_function_falls_back_to_numpy(load_stale, capsys,
                                                             missing: str) -> None:
    assert load_stale(_StaleLib(cnewton.ABI_VERSION, missing=missing)) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and missing in err[0] and "numpy" in err[0], err


def test_each_error_code_names_its_cause() -> None:
    cnewton._check(cnewton.OK)
    with pytest.raises(MemoryError, match="could not allocate"):
        cnewton._check(cnewton.NO_MEMORY)
    with pytest.raises(RuntimeError, match="eigen-solver did not converge"):
        cnewton._check(cnewton.NO_EIGEN)


def test_an_eigen_solver_that_does_not_converge_is_an_error() -> None:
    """QL on a matrix with NaN never deflates: an error, not a garbage step."""
    A = np.diag([1.0, -2.0, 3.0])
    A[0, 1] = A[1, 0] = np.nan
    with pytest.raises(RuntimeError, match="eigen-solver did not converge"):
        cnewton.abs_step(A, np.ones(3))


def test_problems_the_eigen_solver_gives_up_on_go_to_numpy(grid: fast.Grid,
                                                            monkeypatch) -> None:
    """With no QL sweeps allowed every indefinite Hessian fails in C: those problems are
    solved by numpy's solver, with a warning, and the optima stay those of the C solver."""
    obj, theta0 = fast.problems(grid, "distill")
    want, want_status = cnewton.solve(obj, theta0)
    monkeypatch.setattr(rules, "QL_SWEEPS", 0)
    with pytest.warns(RuntimeWarning, match="numpy's solver solved them"):
        got, status = cnewton.solve(obj, theta0)
    assert not (status == rules.FAILED).any()
    centred = np.abs((got - got.mean(0)) - (want - want.mean(0))).max(0)
    assert centred.max() <= 1e-6, centred.max()
    assert (status == want_status).mean() >= 0.999
