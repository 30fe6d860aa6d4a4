"""Batched damped Newton in numpy for the toy's iterative objectives (no torch import).

The same method as :mod:`distalign.tabular.reference.newton` (the steps, stopping rules and
line search of :mod:`distalign.tabular.rules`, so the same optima), laid out for numpy:
problems are the LAST axis (θ is ``[K, P]``, the Hessian ``[K, K, P]``), so every operation of
the K×K algebra, the Cholesky factorisation included, is one pass over contiguous rows of P
values. A working set of at most ``SLAB``
problems is iterated and refilled from the queue as problems converge, so no pass runs on a
handful of stragglers: each problem keeps its own iteration count.

Per context, F(θ) = Σ_{i<j} w_ij ψ(θ_i − θ_j) + c·KL(softmax θ ‖ π₀) + (ρ/2)‖θ − mean θ‖² with
the logistic pair term ψ(d) = softplus(−a d) + q·a d + o: (9) (a = 1), PMLE's (4) with both
orientations of a pair in one term (a = γ) and distillation's (12) (a = γ, o = −H(target)).
``tests/test_tabular_fast.py`` checks ψ, ψ′, ψ″ against the ``distalign.objectives`` losses.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from distalign.tabular import rules
from distalign.tabular.rules import CONVERGED, QUADRATIC, SLAB, STALLED, UNCONVERGED


def unordered_pairs(K: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j), i < j, in the order of :func:`~.pairwise.pair_index` (unordered)."""
    i, j = np.triu_indices(K, 1)
    return i, j


@dataclass(frozen=True)
class Objective:
    """F above for P problems whose pair data are columns of D data columns.

    ``weight``, ``share`` (q) and ``offset`` (o, value only) are ``[M, D]`` over the pairs of
    :func:`unordered_pairs`; ``data`` (``[P]``) names each problem's column; ``kl_coef``
    (``[P]``) with ``log_ref`` (``[K, D]``) the KL term.
    """

    scale: float
    weight: np.ndarray
    share: np.ndarray
    data: np.ndarray
    ridge: float = 0.0
    offset: np.ndarray | None = None
    kl_coef: np.ndarray | None = None
    log_ref: np.ndarray | None = None

    @functools.cached_property
    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """``aW`` (``[K, K, D]``, a·w of pair {i, j} at (i, j) and (j, i), 0 on the diagonal)
        and ``g0`` (``[K, D]``), such that the pair part of the gradient is
        g_i = Σ_j aW_ij σ(z_ij) + g0_i, z_ij = a(θ_i − θ_j): ψ′ = a(σ(z) + q − 1) for the pair
        (i, j), and the mirrored pair contributes −ψ′ = a(σ(z_ji) − q) (σ(−z) = 1 − σ(z))."""
        M, D = self.weight.shape
        K = round((1 + math.sqrt(1 + 8 * M)) / 2)
        i, j = unordered_pairs(K)
        aW = np.zeros((K, K, D))
        aW[i, j] = self.scale * self.weight
        aW[j, i] = self.scale * self.weight
        shifts = np.zeros((K, K, D))
        shifts[i, j] = self.share - 1
        shifts[j, i] = -self.share
        return aW, (aW * shifts).sum(1)

    @functools.cached_property
    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """The affine part of Σ w ψ per data column: Σ_m w_m q_m z_m = lin·θ (``[K, D]``) and
        Σ_m w_m o_m (``[D]``), so a value costs no pass over the pairs' q and o."""
        M, D = self.weight.shape
        K = round((1 + math.sqrt(1 + 8 * M)) / 2)
        i, j = unordered_pairs(K)
        wq = self.scale * self.weight * self.share
        lin = np.zeros((K, D))
        np.add.at(lin, i, wq)
        np.subtract.at(lin, j, wq)
        const = np.zeros(D) if self.offset is None else (self.weight * self.offset).sum(0)
        return lin, const

    def at(self, ids: np.ndarray) -> _Batch:
        """The problems ``ids``."""
        return _Batch(self, self.data[ids], ids)

    def subset(self, ids: np.ndarray) -> Objective:
        """The same objective over the problems ``ids`` only (renumbered 0…)."""
        kl = None if self.kl_coef is None else self.kl_coef[ids]
        return replace(self, data=self.data[ids], kl_coef=kl)


def _exp_shifted(theta: np.ndarray, a: float) -> np.ndarray:
    """E = exp(a(θ − max θ)) ∈ (0, 1]: σ(a(θ_i − θ_j)) = E_i/(E_i + E_j), so a problem needs
    K exponentials instead of one per pair (numpy's float64 exp is scalar libm code on AVX2)."""
    return np.exp(a * (theta - theta.max(0)))


@dataclass(frozen=True)
class _Batch:
    obj: Objective
    cols: np.ndarray
    ids: np.ndarray

    def value(self, theta: np.ndarray) -> np.ndarray:
        obj, cols = self.obj, self.cols
        i, j = unordered_pairs(theta.shape[0])
        z = obj.scale * (theta[i] - theta[j])
        E = _exp_shifted(theta, obj.scale)
        lo, hi = np.minimum(E[i], E[j]), np.maximum(E[i], E[j])
        if not (hi > 0).all():  # both underflowed (logit gaps > 1400/a): the long way
            lo, hi = np.exp(-np.abs(z)), np.ones_like(z)
        # ψ = softplus(−z) + q z (+ o) of (4)/(9)/(12), both orientations of the pair; the
        # affine q z + o is summed per column (see affine);
        # softplus(−z) = max(−z, 0) + ln(1 + e^{−|z|}) and e^{−|z|} = min(E_i, E_j)/max(…)
        psi = np.log1p(lo / hi)
        psi += np.maximum(-z, 0.0)
        psi *= _take(obj.weight, cols)
        lin, const = obj.affine
        out = psi.sum(0) + (_take(lin, cols) * theta).sum(0) + _take(const, cols)
        if obj.kl_coef is not None:
            log_p = _log_softmax(theta)
            kl = (np.exp(log_p) * (log_p - _take(obj.log_ref, cols))).sum(0)
            out += obj.kl_coef[self.ids] * kl
        if obj.ridge:
            dev = theta - theta.mean(0)
            out += 0.5 * obj.ridge * (dev * dev).sum(0)
        return out

    def grad_hess(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gradient ``[K, W]`` and Hessian ``[K, K, W]`` (in place where it saves a pass)."""
        obj, cols = self.obj, self.cols
        K = theta.shape[0]
        a = obj.scale
        aW, g0 = obj.dense
        aW = _take(aW, cols)
        E = _exp_shifted(theta, a)
        T = E[:, None] + E[None, :]
        if not (T > 0).all():  # both underflowed: σ from the pair differences
            e = np.exp(-np.abs(a * (theta[:, None] - theta[None, :])))
            S = np.where(theta[:, None] >= theta[None, :], 1 / (1 + e), e / (1 + e))
        else:
            S = np.reciprocal(T, out=T)
            S *= E[:, None]  # σ(z_ij)
        g = (aW * S).sum(1)
        g += _take(g0, cols)
        A = S * S.transpose(1, 0, 2)  # σ(z)σ(−z); w ψ″ = a² w σ(z)σ(−z)
        A *= aW
        A *= a
        diag = A.sum(1)
        H = np.negative(A, out=A)
        if obj.kl_coef is not None:
            c = obj.kl_coef[self.ids]
            log_p = _log_softmax(theta)
            p = np.exp(log_p)
            h = log_p - _take(obj.log_ref, cols)
            gk = p * (h - (p * h).sum(0))
            u = gk + 0.5 * p
            g += c * gk
            outer = (c * p)[:, None] * u[None, :]
            H -= outer
            H -= outer.transpose(1, 0, 2)
            diag += c * (gk + p)
        r = obj.ridge
        if r:
            H -= r / K
            diag += r
            g += r * (theta - theta.mean(0))
        idx = np.arange(K)
        H[idx, idx] += diag
        return g, H


def _take(a: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Problems ``which`` (indices or a mask) of the last axis, C-contiguous: ``a[:, idx]``
    returns a transposed layout, which would make every later pass strided."""
    if which.dtype == bool:
        return np.compress(which, a, axis=-1)
    return np.take(a, which, axis=-1)


def _log_softmax(theta: np.ndarray) -> np.ndarray:
    z = theta - theta.max(0)
    return z - np.log(np.exp(z).sum(0))


def cholesky_solve(A: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x = A⁻¹b for ``[K, K, W]`` matrices and ``[K, W]`` vectors, and where the Cholesky
    factorisation failed (A not positive definite: x is then garbage there)."""
    K = A.shape[0]
    L = np.zeros_like(A)
    bad = np.zeros(A.shape[2], dtype=bool)
    for j in range(K):
        s = A[j, j] - (L[j, :j] * L[j, :j]).sum(0)
        bad |= ~(s > 0)
        L[j, j] = np.sqrt(np.where(bad, 1.0, s))
        if j + 1 < K:
            col = (A[j + 1:, j] - (L[j + 1:, :j] * L[j, :j]).sum(1)) / L[j, j]
            # a failed factorisation is continued on zeros: garbage there could overflow or
            # turn subnormal, and either makes every later pass over the batch slow
            L[j + 1:, j] = np.where(bad, 0.0, col)
    y = np.empty_like(b)
    for j in range(K):
        y[j] = (b[j] - (L[j, :j] * y[:j]).sum(0)) / L[j, j]
    x = np.empty_like(b)
    for j in range(K - 1, -1, -1):
        x[j] = (y[j] - (L[j + 1:, j] * x[j + 1:]).sum(0)) / L[j, j]
    return x, bad


def newton_step(g: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Solve (H + c·11ᵀ/K) s = −g in the centred subspace; |eigenvalues| where indefinite."""
    K = g.shape[0]
    g = g - g.mean(0)
    scale = np.maximum(np.abs(np.diagonal(H)).mean(-1), rules.TINY)  # diagonal: [W, K]
    Hs = H + scale / K
    step, bad = cholesky_solve(Hs, -g)
    if bad.any():
        # non-convex region (the KL is not convex in logits): |eigenvalues|, floored
        evals, evecs = np.linalg.eigh(_take(Hs, bad).transpose(2, 0, 1))
        evals = np.abs(evals)
        evals = np.maximum(evals, rules.EIG_FLOOR * evals.max(-1, keepdims=True))
        coef = np.einsum("wki,kw->wi", evecs, _take(g, bad)) / evals
        step[:, bad] = -np.einsum("wki,wi->kw", evecs, coef)
    return step - step.mean(0)


def solve(obj: Objective, theta0: np.ndarray, max_iter: int = rules.MAX_ITER, slab: int = SLAB,
          threads: int = 1, status: np.ndarray | None = None
          ) -> tuple[np.ndarray, dict[str, float]]:
    """Minimise F from ``theta0`` (``[K, P]``) for every problem; see the module docstring.

    A problem retires when its Newton decrement is below QUADRATIC (after one last full step),
    when it has stalled at rounding level, or after ``max_iter`` iterations; far from the
    optimum (decrement > NEAR) Armijo backtracking guards the capped step. With ``threads``
    > 1 each thread iterates its own working set, refilled from one shared queue (numpy
    releases the GIL inside its kernels); problems are independent, so the result does not
    depend on which thread solved what. ``status`` (``[P]`` int8), if given, receives how each
    problem ended: CONVERGED, STALLED or UNCONVERGED.
    """
    P = theta0.shape[1]
    status = np.empty(P, dtype=np.int8) if status is None else status
    theta0 = np.ascontiguousarray(theta0)  # rows of P values: every pass is contiguous
    theta = theta0.copy()
    starts = iter(range(0, P, max(slab // 2, 1)))
    lock = threading.Lock()

    def next_block() -> np.ndarray | None:
        with lock:
            start = next(starts, None)
        return None if start is None else np.arange(start, min(P, start + max(slab // 2, 1)))

    def work(_: int) -> dict[str, float]:
        return _solve_queue(obj, theta0, theta, status, next_block, max_iter, slab)

    if threads == 1 or slab >= P:
        parts = [work(0)]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="newton") as pool:
            parts = list(pool.map(work, range(threads)))
    stats = {key: sum(part[key] for part in parts) for key in parts[0]}
    stats["iterations"] = max(part["iterations"] for part in parts)
    return theta, stats


def _solve_queue(obj: Objective, theta0: np.ndarray, theta: np.ndarray, status: np.ndarray,
                 next_block: Callable[[], np.ndarray | None], max_iter: int,
                 slab: int) -> dict[str, float]:
    """One working set: iterate, retire into ``theta``, refill from ``next_block``."""
    K = theta0.shape[0]
    ids = np.empty(0, dtype=np.int64)
    th = np.empty((K, 0))
    F = np.empty(0)
    dec_prev = np.empty(0)
    its = np.empty(0, dtype=np.int64)
    stats = {"iterations": 0.0, "unconverged": 0.0, "stalled": 0.0, "work": 0.0}
    while True:
        new = next_block() if ids.size <= slab // 2 else None
        if new is not None:  # refill the working set from the queue
            ids = np.concatenate([ids, new])
            th = np.concatenate([th, _take(theta0, new)], 1)
            F = np.concatenate([F, np.full(new.size, np.nan)])
            dec_prev = np.concatenate([dec_prev, np.full(new.size, np.inf)])
            its = np.concatenate([its, np.zeros(new.size, dtype=np.int64)])
        if ids.size == 0:
            break
        batch = obj.at(ids)
        stats["work"] += ids.size
        g, H = batch.grad_hess(th)
        step = newton_step(g, H)
        dec = -(g * step).sum(0)
        stalled = (dec < rules.STALL_DECREMENT) & (dec > rules.STALL_RATIO * dec_prev)
        stats["stalled"] += float(stalled.sum())
        final = (dec < QUADRATIC) & ~stalled
        # in the quadratic regime one more full step makes θ exact to ~dec: take it, retire
        theta[:, ids[final]] = _take(th, final) + _take(step, final)
        live = (dec >= rules.TOL) & ~final & ~stalled
        done = ~live & ~final
        theta[:, ids[done]] = _take(th, done)
        status[ids[final | done]] = CONVERGED
        status[ids[stalled]] = STALLED
        if not live.all():
            ids, th, step, F, g, dec = (ids[live], _take(th, live), _take(step, live), F[live],
                                        _take(g, live), dec[live])
            its = its[live]
            batch = obj.at(ids)
        if ids.size == 0:
            continue
        # trust cap: no logit moves by more than MAX_STEP in one iteration
        step = step * (rules.MAX_STEP / np.maximum(np.abs(step).max(0), rules.MAX_STEP))
        new_th = th + step
        F_new = np.full(ids.size, np.nan)
        far = np.flatnonzero(dec > rules.NEAR)
        if far.size:
            step_far = _take(step, far)
            new_th[:, far], F_new[far] = _line_search(
                obj, ids[far], _take(th, far), step_far, F[far], _take(g, far) * step_far)
        th, F, dec_prev = new_th, F_new, dec
        its += 1
        out = its >= max_iter
        if out.any():  # out of iterations: keep the last point, count it as unconverged
            stats["unconverged"] += float(out.sum())
            theta[:, ids[out]] = _take(th, out)
            status[ids[out]] = UNCONVERGED
            keep = ~out
            ids, th, F, dec_prev = ids[keep], _take(th, keep), F[keep], dec_prev[keep]
            its = its[keep]
        stats["iterations"] = max(stats["iterations"], float(its.max(initial=0)))
    return stats


def _line_search(obj: Objective, ids: np.ndarray, th: np.ndarray, step: np.ndarray,
                 F: np.ndarray, g_step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Armijo backtracking with quadratic interpolation (reference.newton._newton_flat)."""
    batch = obj.at(ids)
    missing = np.isnan(F)
    if missing.any():
        F = F.copy()
        F[missing] = obj.at(ids[missing]).value(_take(th, missing))
    slope = -g_step.sum(0)
    t = np.ones_like(slope)
    trial = th + step
    F_trial = batch.value(trial)
    for _ in range(rules.BACKTRACKS):
        ok = F_trial <= F - rules.ARMIJO * t * slope
        if ok.all():
            break
        redo = np.flatnonzero(~ok)
        # minimiser of the quadratic through F(0), F'(0) and F(t), kept in [t/10, t/2]
        tr = t[redo]
        curv = np.maximum(F_trial[redo] - F[redo] + tr * slope[redo], rules.TINY)
        t[redo] = np.clip(slope[redo] * tr * tr / (2 * curv), rules.SHRINK_MIN * tr,
                          rules.SHRINK_MAX * tr)
        trial[:, redo] = _take(th, redo) + t[redo] * _take(step, redo)
        F_trial[redo] = obj.at(ids[redo]).value(_take(trial, redo))
    ok = F_trial <= F
    return np.where(ok, trial, th), np.where(ok, F_trial, F)
