"""The damped Newton of :mod:`.newton`, compiled: ``_newton.c`` called through ctypes.

Same objective, steps, stopping rules and line search as ``newton._solve_queue`` (the rules of
:mod:`distalign.tabular.rules`, passed in on every call), so the same optima, one K×K problem
at a time: numpy pays one pass over memory per elementwise operation, which for K = 10 costs
more than the arithmetic. ctypes releases the GIL during the call, so threads share the
problems. The extension is built when the package is installed (setup.py, optional).

Importing this module raises ImportError where the extension cannot be used: ModuleNotFoundError
where it is not built, :class:`StaleExtension` where it was built from another ``_newton.h``
(its ABI version differs, or a function is missing); the engine then runs numpy's solver.
ctypes cannot read a C header, so the signatures below are a copy of ``_newton.h``:
``tests/test_tabular_cnewton.py`` checks the copy against the header, and the ABI version
checked here on load guards against an extension built before the header changed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distalign.tabular import rules
from distalign.tabular.fast import newton
from distalign.tabular.fast.newton import Objective

#: must equal DISTALIGN_NEWTON_ABI of _newton.h
ABI_VERSION = 2
#: return codes of the C functions (_newton.h)
OK, NO_MEMORY, NO_EIGEN = 0, 1, 2


class StaleExtension(ImportError):
    """The built extension does not match this code: rebuild it (``pip install -e .``)."""


class Rules(ctypes.Structure):
    """``newton_rules`` of _newton.h."""

    _fields_ = [(name, ctypes.c_int) for name in ("max_iter", "backtracks", "ql_sweeps")] + [
        (name, ctypes.c_double) for name in (
            "tol", "quadratic", "near", "max_step", "stall_decrement", "stall_ratio", "armijo",
            "shrink_min", "shrink_max", "eig_floor", "tiny")]


def c_rules(**overrides: float) -> Rules:
    """:mod:`distalign.tabular.rules` as the C struct (read on every call, so never stale)."""
    values = {name: getattr(rules, name.upper()) for name, _ in Rules._fields_}
    values.update(overrides)
    return Rules(**values)


#: the C types of _newton.h, as ctypes sees them
_CTYPES = {
    "int": ctypes.c_int, "int64_t": ctypes.c_int64, "double": ctypes.c_double,
    "const double *": np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS"),
    "double *": np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS"),
    "const int64_t *": np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS"),
    "int8_t *": np.ctypeslib.ndpointer(np.int8, flags="C_CONTIGUOUS"),
    "const newton_rules *": ctypes.POINTER(Rules),
}
_D, _CD, _CI = "double *", "const double *", "const int64_t *"
#: the exported functions' parameter types, in _newton.h's words; each returns an int code
SIGNATURES: dict[str, tuple[str, ...]] = {
    "distalign_newton_abi": (),
    "newton_rules_bytes": (),
    "solve_range": ("int64_t", "int64_t", "int", "int", _CD, _D, "int8_t *", _CI, _CD, _CD,
                    _CD, _CD, _CD, _CD, "double", "double", _CI, _CI,
                    "const newton_rules *"),
    "values": ("int64_t", "int", "int", _CD, _CI, _CD, _CD, _CD, _CD, _CD, "double", "double",
               _CI, _CI, _D),
    "abs_newton_step": ("int", _CD, _CD, _D, "const newton_rules *"),
}


def load(path: str) -> ctypes.CDLL:
    """The extension at ``path`` with its signatures bound, after checking that it was built
    from this code's _newton.h (else :class:`StaleExtension`)."""
    lib = ctypes.CDLL(path)
    try:  # a missing function is an AttributeError: an extension older than this code
        for name, params in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = [_CTYPES[p] for p in params]
            fn.restype = ctypes.c_int
        abi = lib.distalign_newton_abi()
        size = lib.newton_rules_bytes()
    except AttributeError as exc:
        raise StaleExtension(f"the compiled Newton solver was built from older sources ({exc})"
                             ) from None
    if abi != ABI_VERSION or size != ctypes.sizeof(Rules):
        raise StaleExtension(f"the compiled Newton solver ({path}) has ABI version {abi}, this "
                             f"code needs {ABI_VERSION}: it was built from other sources")
    return lib


def _path() -> str:
    spec = importlib.util.find_spec("distalign.tabular.fast._newton")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("distalign.tabular.fast._newton is not built (see setup.py)",
                                  name="distalign.tabular.fast._newton")
    return spec.origin


_LIB = load(_path())


def _check(code: int) -> None:
    """Raise for a C function's code (NO_EIGEN is handled by the callers that can)."""
    if code == NO_MEMORY:
        raise MemoryError("the compiled Newton solver could not allocate its scratch memory")
    if code == NO_EIGEN:
        raise RuntimeError("the compiled eigen-solver did not converge (QL, "
                           f"{rules.QL_SWEEPS} sweeps per eigenvalue): is the matrix finite?")
    if code != OK:
        raise RuntimeError(f"the compiled Newton solver returned the unknown code {code}")


def abs_step(A: np.ndarray, g: np.ndarray) -> np.ndarray:
    """−V|Λ|⁻¹Vᵀg for the symmetric ``A`` = VΛVᵀ, |λ| floored at EIG_FLOOR·max|λ|: the Newton
    step the solver takes where the Hessian is indefinite."""
    K = g.size
    step = np.empty(K)
    _check(_LIB.abs_newton_step(K, np.ascontiguousarray(A, dtype=np.float64),
                                np.ascontiguousarray(g, dtype=np.float64), step,
                                ctypes.byref(c_rules())))
    return step


def _tables(obj: Objective, K: int) -> tuple:
    """The objective's tables, one C-contiguous row per data column."""
    M, D = obj.weight.shape
    lin, const = obj.affine
    P = obj.data.size
    i, j = np.triu_indices(K, 1)
    return (np.ascontiguousarray(obj.data, dtype=np.int64),
            np.ascontiguousarray(obj.weight.T),
            np.ascontiguousarray(np.broadcast_to(obj.share, (M, D)).T),
            np.ascontiguousarray(lin.T), np.ascontiguousarray(const),
            np.zeros((D, K)) if obj.log_ref is None else np.ascontiguousarray(obj.log_ref.T),
            np.zeros(P) if obj.kl_coef is None else np.ascontiguousarray(obj.kl_coef, float),
            float(obj.scale), float(obj.ridge), i.astype(np.int64), j.astype(np.int64))


def values(obj: Objective, theta: np.ndarray) -> np.ndarray:
    """F at ``theta`` (``[K, P]``) for every problem (newton._Batch.value)."""
    K, P = theta.shape
    cols, W, _, LIN, CONST, LREF, kl, a, ridge, i, j = _tables(obj, K)
    out = np.empty(P)
    _check(_LIB.values(P, K, i.size, np.ascontiguousarray(theta.T), cols, W, LIN, CONST, LREF,
                       kl, a, ridge, i, j, out))
    return out


def solve(obj: Objective, theta0: np.ndarray, max_iter: int = rules.MAX_ITER, threads: int = 1,
          chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Minimise F from ``theta0`` (``[K, P]``, numpy's layout) for every problem.

    Returns θ (``[K, P]``) and how each problem ended (rules.CONVERGED, STALLED, UNCONVERGED).
    Problems are independent: the result does not depend on ``threads``. Where the compiled
    eigen-solver gives up (FAILED), numpy's solver (LAPACK's eigh) solves the problem again,
    with a warning.
    """
    K, P = theta0.shape
    cols, W, Q, LIN, CONST, LREF, kl, a, ridge, i, j = _tables(obj, K)
    th0 = np.ascontiguousarray(theta0.T)
    theta = np.empty_like(th0)
    status = np.empty(P, dtype=np.int8)
    c = ctypes.byref(c_rules(max_iter=max_iter))

    def work(start: int) -> int:
        return _LIB.solve_range(start, min(P, start + chunk), K, i.size, th0, theta, status,
                                cols, W, Q, LIN, CONST, LREF, kl, a, ridge, i, j, c)

    starts = range(0, P, chunk)
    if threads <= 1 or len(starts) == 1:
        codes = [work(s) for s in starts]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="newton") as pool:
            codes = list(pool.map(work, starts))
    for code in codes:
        if code != NO_EIGEN:
            _check(code)
    theta = np.ascontiguousarray(theta.T)
    failed = np.flatnonzero(status == rules.FAILED)
    if failed.size:
        warnings.warn(f"the compiled eigen-solver did not converge on {failed.size} of {P} "
                      "Newton problems; numpy's solver solved them", RuntimeWarning,
                      stacklevel=2)
        sub_status = np.empty(failed.size, dtype=np.int8)
        theta[:, failed], _ = newton.solve(obj.subset(failed), theta0[:, failed],
                                           max_iter=max_iter, status=sub_status)
        status[failed] = sub_status
    return theta, status
