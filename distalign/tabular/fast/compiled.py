"""The damped Newton of :mod:`.newton`, compiled: ``_newton.c`` called through ctypes.

Same objective, steps, stopping rules and line search as ``newton._solve_queue`` (so the
same optima), one K×K problem at a time: numpy pays one pass over memory per elementwise
operation, which for K = 10 costs more than the arithmetic. ctypes releases the GIL during
the call, so threads share the problems. The extension is built when the package is
installed (setup.py, optional): where it is missing, importing this module raises
ImportError and the toy uses numpy's solver.
"""

from __future__ import annotations

import ctypes
import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distalign.tabular.fast.newton import Objective
from distalign.tabular.rules import MAX_STEP, NEAR, QUADRATIC, TOL


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec("distalign.tabular.fast._newton")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("distalign.tabular.fast._newton is not built (see setup.py)",
                                  name="distalign.tabular.fast._newton")
    lib = ctypes.CDLL(spec.origin)
    f64, i64, i8 = (np.ctypeslib.ndpointer(t, flags="C_CONTIGUOUS")
                    for t in (np.float64, np.int64, np.int8))
    c_int, c_i64, c_dbl = ctypes.c_int, ctypes.c_int64, ctypes.c_double
    lib.solve_range.argtypes = [c_i64, c_i64, c_int, c_int, f64, f64, i8, i64, f64, f64,
                                f64, f64, f64, f64, c_dbl, c_dbl, i64, i64, c_int, c_dbl,
                                c_dbl, c_dbl, c_dbl]
    lib.values.argtypes = [c_i64, c_int, c_int, f64, i64, f64, f64, f64, f64, f64, c_dbl,
                           c_dbl, i64, i64, f64]
    lib.abs_newton_step.argtypes = [c_int, f64, f64, f64]
    lib.solve_range.restype = lib.values.restype = lib.abs_newton_step.restype = c_int
    return lib


_LIB = _load()


def abs_step(A: np.ndarray, g: np.ndarray) -> np.ndarray:
    """−V|Λ|⁻¹Vᵀg for the symmetric ``A`` = VΛVᵀ, |λ| floored at 1e-6 max|λ|: the Newton
    step the solver takes where the Hessian is indefinite."""
    K = g.size
    step = np.empty(K)
    if _LIB.abs_newton_step(K, np.ascontiguousarray(A, dtype=np.float64),
                            np.ascontiguousarray(g, dtype=np.float64), step):
        raise RuntimeError("the eigen-solver did not converge")
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
    if _LIB.values(P, K, i.size, np.ascontiguousarray(theta.T), cols, W, LIN, CONST, LREF,
                   kl, a, ridge, i, j, out):
        raise MemoryError("the Newton extension could not allocate its scratch memory")
    return out


def solve(obj: Objective, theta0: np.ndarray, max_iter: int = 100, threads: int = 1,
          chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Minimise F from ``theta0`` (``[K, P]``, numpy's layout) for every problem.

    Returns θ (``[K, P]``) and how each problem ended (rules.CONVERGED, STALLED,
    UNCONVERGED). Problems are independent: the result does not depend on ``threads``.
    """
    K, P = theta0.shape
    cols, W, Q, LIN, CONST, LREF, kl, a, ridge, i, j = _tables(obj, K)
    th0 = np.ascontiguousarray(theta0.T)
    theta = np.empty_like(th0)
    status = np.empty(P, dtype=np.int8)

    def work(start: int) -> int:
        return _LIB.solve_range(start, min(P, start + chunk), K, i.size, th0, theta, status,
                                cols, W, Q, LIN, CONST, LREF, kl, a, ridge, i, j,
                                max_iter, MAX_STEP, NEAR, QUADRATIC, TOL)

    starts = range(0, P, chunk)
    if threads <= 1 or len(starts) == 1:
        codes = [work(s) for s in starts]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="newton") as pool:
            codes = list(pool.map(work, starts))
    if any(codes):
        raise MemoryError("the Newton extension could not allocate its scratch memory")
    return np.ascontiguousarray(theta.T), status
