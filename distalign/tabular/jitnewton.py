"""The damped Newton of :mod:`distalign.tabular.fastnewton`, compiled per problem with numba.

Same objective, steps, stopping rules and line search as ``fastnewton._solve_queue`` (so the
same optima), but one K×K problem at a time in compiled code: numpy pays one pass over
memory per elementwise operation, which for K = 10 costs more than the arithmetic. The
compiled solver releases the GIL, so threads share the problems. Compiled code is cached on
disk (numba's ``cache=True``): the first run in a fresh install compiles for a few seconds.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from distalign.tabular.fastnewton import (
    CONVERGED,
    MAX_STEP,
    NEAR,
    QUADRATIC,
    STALLED,
    TOL,
    UNCONVERGED,
    Objective,
)

MAX_ROTATIONS = 4096  # QL rotations recorded per eigen-solve (~100 needed for K = 10)
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")


@_jit
def _kl_parts(th, mx, lref, p, h):  # pragma: no cover - compiled
    """p = softmax θ into ``p``, h = ln p − ln π₀ into ``h``; returns KL(p‖π₀) = p·h."""
    K = th.shape[0]
    s = 0.0
    for k in range(K):
        p[k] = math.exp(th[k] - mx)
        s += p[k]
    lse = math.log(s)
    kl = 0.0
    for k in range(K):
        p[k] /= s
        h[k] = th[k] - mx - lse - lref[k]
        kl += p[k] * h[k]
    return kl


@_jit
def _value(th, w, lin, const, lref, c, a, ridge, pi_, pj_, E, p, h):  # pragma: no cover
    """F(θ) of fastnewton.Objective for one problem; ``E``, ``p``, ``h`` are scratch."""
    K = th.shape[0]
    mx = th.max()
    for k in range(K):
        E[k] = math.exp(a * (th[k] - mx))
    out = const
    for m in range(pi_.shape[0]):
        i, j = pi_[m], pj_[m]
        T = E[i] + E[j]
        # softplus(−z) = −ln σ(z) = ln(E_i + E_j) − ln E_i, z = a(θ_i − θ_j)
        if T > 0.0:
            sp = math.log(T) - a * (th[i] - mx)
        else:  # both underflowed (gaps > 1400/a)
            z = a * (th[i] - th[j])
            sp = math.log1p(math.exp(-abs(z))) + max(-z, 0.0)
        out += sp * w[m]
    for k in range(K):
        out += lin[k] * th[k]
    if c != 0.0:
        out += c * _kl_parts(th, mx, lref, p, h)
    if ridge != 0.0:
        mean = th.mean()
        ss = 0.0
        for k in range(K):
            ss += (th[k] - mean) ** 2
        out += 0.5 * ridge * ss
    return out


@_jit
def _grad_hess(th, w, q, lref, c, a, ridge, pi_, pj_, g, H, E, p, h):  # pragma: no cover
    """Gradient into ``g`` and Hessian into ``H`` (fastnewton._Batch.grad_hess)."""
    K = th.shape[0]
    mx = th.max()
    for k in range(K):
        E[k] = math.exp(a * (th[k] - mx))
        g[k] = 0.0
        for l in range(K):
            H[k, l] = 0.0
    for m in range(pi_.shape[0]):
        i, j = pi_[m], pj_[m]
        T = E[i] + E[j]
        if T > 0.0:  # σ(z_ij) = E_i/(E_i + E_j)
            sij, sji = E[i] / T, E[j] / T
        else:  # both underflowed: σ from the difference
            e = math.exp(-abs(a * (th[i] - th[j])))
            if th[i] >= th[j]:
                sij, sji = 1.0 / (1.0 + e), e / (1.0 + e)
            else:
                sij, sji = e / (1.0 + e), 1.0 / (1.0 + e)
        aw = a * w[m]
        g[i] += aw * (sij + q[m] - 1.0)
        g[j] += aw * (sji - q[m])
        A = sij * sji * aw * a  # a²w σ(z)σ(−z) = w ψ″
        H[i, j] -= A
        H[j, i] -= A
        H[i, i] += A
        H[j, j] += A
    if c != 0.0:  # c·KL(softmax θ ‖ π₀): gradient p(h − p·h)
        kl = _kl_parts(th, mx, lref, p, h)
        for k in range(K):
            h[k] = p[k] * (h[k] - kl)  # h ← the KL gradient gk
        for k in range(K):
            uk = h[k] + 0.5 * p[k]
            g[k] += c * h[k]
            for l in range(K):
                ul = h[l] + 0.5 * p[l]
                H[k, l] -= c * p[k] * ul + c * p[l] * uk
            H[k, k] += c * (h[k] + p[k])
    if ridge != 0.0:
        mean = th.mean()
        for k in range(K):
            g[k] += ridge * (th[k] - mean)
            for l in range(K):
                H[k, l] -= ridge / K
            H[k, k] += ridge


@_jit
def _abs_step(A, g, step, d, e, y, rot_i, rot_cs):  # pragma: no cover - compiled
    """step = −V|Λ|⁻¹Vᵀg for the symmetric ``A`` = VΛVᵀ (overwritten), |λ| floored at 1e-6
    max|λ| as in fastnewton.newton_step; ``d``, ``e``, ``y``, ``rot_*`` are scratch.

    V is never formed: Householder reflections take A to a tridiagonal T = QᵀAQ and are
    applied to g; implicit QL sweeps (Wilkinson-type shifts, the method of LAPACK's dsteqr)
    diagonalise T = ZΛZᵀ, rotating Qᵀg on the fly and recording the rotations to apply Z
    afterwards. For K = 10 this is a few thousand flops, where a library eigh call costs
    more in overhead than in arithmetic.
    """
    K = A.shape[0]
    for k in range(K):
        y[k] = g[k]
    # 1. Householder: reflector k (unit v in A[k+1:, k]) zeroes column k below the
    #    sub-diagonal; A₂₂ ← PA₂₂P with P = I − 2vvᵀ, and y ← Py
    for k in range(K - 2):
        n = K - k - 1
        norm = 0.0
        for i in range(k + 1, K):
            norm += A[i, k] * A[i, k]
        norm = math.sqrt(norm)
        alpha = -norm if A[k + 1, k] > 0.0 else norm
        A[k + 1, k] -= alpha
        vn = 0.0
        for i in range(k + 1, K):
            vn += A[i, k] * A[i, k]
        e[k] = alpha
        if vn == 0.0:  # already reduced: an identity reflector
            e[k] = A[k + 1, k] + alpha
            for i in range(k + 1, K):
                A[i, k] = 0.0
            continue
        vn = math.sqrt(vn)
        kappa = 0.0
        for i in range(k + 1, K):
            A[i, k] /= vn
        for i in range(n):  # d ← A₂₂v (scratch), then d ← d − (vᵀd)v
            s = 0.0
            for j in range(n):
                s += A[k + 1 + i, k + 1 + j] * A[k + 1 + j, k]
            d[i] = s
            kappa += A[k + 1 + i, k] * s
        for i in range(n):
            d[i] -= kappa * A[k + 1 + i, k]
        for i in range(n):
            vi = A[k + 1 + i, k]
            for j in range(n):
                A[k + 1 + i, k + 1 + j] -= 2.0 * (vi * d[j] + d[i] * A[k + 1 + j, k])
        s = 0.0
        for i in range(n):
            s += A[k + 1 + i, k] * y[k + 1 + i]
        for i in range(n):
            y[k + 1 + i] -= 2.0 * s * A[k + 1 + i, k]
    for k in range(K):
        d[k] = A[k, k]
    if K >= 2:
        e[K - 2] = A[K - 1, K - 2]
    e[K - 1] = 0.0
    # 2. implicit QL on (d, e); each rotation R of coordinates (i, i+1) is applied to y
    #    (y ← Rᵀy) and recorded
    nrot = 0
    for l in range(K):
        for _ in range(60):
            m = l
            while m < K - 1:
                if abs(e[m]) <= 1e-16 * (abs(d[m]) + abs(d[m + 1])):
                    break
                m += 1
            if m == l:
                break
            gg = (d[l + 1] - d[l]) / (2.0 * e[l])
            r = math.sqrt(gg * gg + 1.0)
            gg = d[m] - d[l] + e[l] / (gg + (r if gg >= 0.0 else -r))
            sn, cs, p = 1.0, 1.0, 0.0
            split = False
            for i in range(m - 1, l - 1, -1):
                f, b = sn * e[i], cs * e[i]
                r = math.sqrt(f * f + gg * gg)
                e[i + 1] = r
                if r == 0.0:  # the chain splits here
                    d[i + 1] -= p
                    e[m] = 0.0
                    split = True
                    break
                inv = 1.0 / r
                sn, cs = f * inv, gg * inv
                gg = d[i + 1] - p
                r = (d[i] - gg) * sn + 2.0 * cs * b
                p = sn * r
                d[i + 1] = gg + p
                gg = cs * r - b
                yi, yj = y[i], y[i + 1]
                y[i] = cs * yi - sn * yj
                y[i + 1] = sn * yi + cs * yj
                if nrot < rot_i.shape[0]:
                    rot_i[nrot] = i
                    rot_cs[nrot, 0] = cs
                    rot_cs[nrot, 1] = sn
                nrot += 1
            if not split:
                d[l] -= p
                e[l] = gg
                e[m] = 0.0
    # 3. divide by |λ| (floored), then apply Z (the rotations in reverse) and Q
    big = 0.0
    for k in range(K):
        big = max(big, abs(d[k]))
    for k in range(K):
        y[k] /= max(abs(d[k]), 1e-6 * big)
    for r in range(min(nrot, rot_i.shape[0]) - 1, -1, -1):
        i = rot_i[r]
        cs, sn = rot_cs[r, 0], rot_cs[r, 1]
        yi, yj = y[i], y[i + 1]
        y[i] = cs * yi + sn * yj
        y[i + 1] = -sn * yi + cs * yj
    for k in range(K - 3, -1, -1):
        s = 0.0
        for i in range(k + 1, K):
            s += A[i, k] * y[i]
        for i in range(k + 1, K):
            y[i] -= 2.0 * s * A[i, k]
    for k in range(K):
        step[k] = -y[k]
    return nrot <= rot_i.shape[0]


@_jit
def _newton_step(g, H, step, L, V, lam, tmp, rot_i, rot_cs):  # pragma: no cover
    """Solve (H + c·11ᵀ/K) s = −g in the centred subspace, |eigenvalues| where the
    Cholesky factorisation fails (fastnewton.newton_step); ``L``, ``V``, ``lam``, ``tmp``
    are scratch. Returns the Newton decrement −g·s of the centred g."""
    K = g.shape[0]
    g -= g.mean()
    scale = 0.0
    for k in range(K):
        scale += abs(H[k, k])
    scale = max(scale / K, 1e-300)
    for i in range(K):
        for j in range(K):
            L[i, j] = H[i, j] + scale / K
    ok = True
    for j in range(K):  # Cholesky in place in the lower triangle of L; 1/L_jj into lam
        s = L[j, j]
        for k in range(j):
            s -= L[j, k] * L[j, k]
        if not s > 0.0:
            ok = False
            break
        d = math.sqrt(s)
        L[j, j] = d
        inv = 1.0 / d
        lam[j] = inv
        for i in range(j + 1, K):
            s = L[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            L[i, j] = s * inv
    if ok:
        for j in range(K):
            s = -g[j]
            for k in range(j):
                s -= L[j, k] * tmp[k]
            tmp[j] = s * lam[j]
        for j in range(K - 1, -1, -1):
            s = tmp[j]
            for k in range(j + 1, K):
                s -= L[k, j] * step[k]
            step[j] = s * lam[j]
    else:  # indefinite (the KL is not convex in logits): the |eigenvalue| Newton step
        for i in range(K):
            for j in range(K):
                L[i, j] = H[i, j] + scale / K
        _abs_step(L, g, step, V[0], V[1], V[2], rot_i, rot_cs)
    step -= step.mean()
    dec = 0.0
    for k in range(K):
        dec -= g[k] * step[k]
    return dec


@_jit
def _solve_range(start, stop, theta0, theta, status, its_out, cols, W, Q, LIN, CONST, LREF,
                 kl, a, ridge, pi_, pj_, max_iter):  # pragma: no cover
    """Problems ``start:stop``: the loop of fastnewton._solve_queue for one problem."""
    K = theta0.shape[1]
    g = np.empty(K)
    H = np.empty((K, K))
    step = np.empty(K)
    L = np.empty((K, K))
    V = np.empty((K, K))
    lam = np.empty(K)
    tmp = np.empty(K)
    th = np.empty(K)
    trial = np.empty(K)
    rot_i = np.empty(MAX_ROTATIONS, dtype=np.int64)
    rot_cs = np.empty((MAX_ROTATIONS, 2))
    E = np.empty(K)
    pp = np.empty(K)
    hh = np.empty(K)
    for p in range(start, stop):
        d = cols[p]
        w, q, lin, const, lref, c = W[d], Q[d], LIN[d], CONST[d], LREF[d], kl[p]
        th[:] = theta0[p]
        F = np.nan
        dec_prev = np.inf
        its = 0
        while True:
            _grad_hess(th, w, q, lref, c, a, ridge, pi_, pj_, g, H, E, pp, hh)
            dec = _newton_step(g, H, step, L, V, lam, tmp, rot_i, rot_cs)
            stalled = dec < 1e-12 and dec > 0.25 * dec_prev
            if dec < QUADRATIC and not stalled:
                # quadratic regime: one more full step makes θ exact to ~dec
                for k in range(K):
                    theta[p, k] = th[k] + step[k]
                status[p] = CONVERGED
                break
            if stalled or not dec >= TOL:
                theta[p] = th
                status[p] = STALLED if stalled else CONVERGED
                break
            big = 0.0
            for k in range(K):
                big = max(big, abs(step[k]))
            step *= MAX_STEP / max(big, MAX_STEP)  # trust cap
            if dec > NEAR:  # Armijo backtracking, quadratic interpolation (fastnewton)
                if np.isnan(F):
                    F = _value(th, w, lin, const, lref, c, a, ridge, pi_, pj_, E, pp, hh)
                slope = 0.0
                for k in range(K):
                    slope -= g[k] * step[k]
                t = 1.0
                for k in range(K):
                    trial[k] = th[k] + step[k]
                Ft = _value(trial, w, lin, const, lref, c, a, ridge, pi_, pj_, E, pp, hh)
                for _ in range(30):
                    if Ft <= F - 1e-4 * t * slope:
                        break
                    curv = max(Ft - F + t * slope, 1e-300)
                    t = min(max(slope * t * t / (2 * curv), 0.1 * t), 0.5 * t)
                    for k in range(K):
                        trial[k] = th[k] + t * step[k]
                    Ft = _value(trial, w, lin, const, lref, c, a, ridge, pi_, pj_, E, pp, hh)
                if Ft <= F:
                    th[:] = trial
                    F = Ft
            else:
                th += step
                F = np.nan
            dec_prev = dec
            its += 1
            if its >= max_iter:
                theta[p] = th
                status[p] = UNCONVERGED
                break
        its_out[p] = its


@_jit
def _values(theta, cols, W, LIN, CONST, LREF, kl, a, ridge, pi_, pj_, out):  # pragma: no cover
    K = theta.shape[1]
    E, pp, hh = np.empty(K), np.empty(K), np.empty(K)
    for p in range(theta.shape[0]):
        d = cols[p]
        out[p] = _value(theta[p], W[d], LIN[d], CONST[d], LREF[d], kl[p], a, ridge, pi_, pj_,
                        E, pp, hh)


def _arrays(obj: Objective, K: int) -> tuple:
    """The objective's tables, one C-contiguous row per data column (numba's layout)."""
    M, D = obj.weight.shape
    lin, const = obj.affine
    P = obj.data.size
    return (np.ascontiguousarray(obj.data, dtype=np.int64),
            np.ascontiguousarray(obj.weight.T),
            np.ascontiguousarray(np.broadcast_to(obj.share, (M, D)).T),
            np.ascontiguousarray(lin.T), np.ascontiguousarray(const),
            np.zeros((D, K)) if obj.log_ref is None else np.ascontiguousarray(obj.log_ref.T),
            np.zeros(P) if obj.kl_coef is None else np.ascontiguousarray(obj.kl_coef, float),
            float(obj.scale), float(obj.ridge), *np.triu_indices(K, 1))


def values(obj: Objective, theta: np.ndarray) -> np.ndarray:
    """F at ``theta`` (``[K, P]``) for every problem (fastnewton._Batch.value)."""
    cols, W, _, LIN, CONST, LREF, kl, a, ridge, i, j = _arrays(obj, theta.shape[0])
    out = np.empty(theta.shape[1])
    _values(np.ascontiguousarray(theta.T), cols, W, LIN, CONST, LREF, kl, a, ridge, i, j, out)
    return out


def solve(obj: Objective, theta0: np.ndarray, max_iter: int = 100, threads: int = 1,
          chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Minimise F from ``theta0`` (``[K, P]``, fastnewton's layout) for every problem.

    Returns θ (``[K, P]``) and how each problem ended (fastnewton's CONVERGED, STALLED,
    UNCONVERGED). Problems are independent: the result does not depend on ``threads``.
    """
    K, P = theta0.shape
    cols, W, Q, LIN, CONST, LREF, kl, a, ridge, i, j = _arrays(obj, K)
    th0 = np.ascontiguousarray(theta0.T)
    theta = np.empty_like(th0)
    status = np.empty(P, dtype=np.int8)
    its = np.empty(P, dtype=np.int32)

    def work(bounds: tuple[int, int]) -> None:
        _solve_range(bounds[0], bounds[1], th0, theta, status, its, cols, W, Q, LIN, CONST,
                     LREF, kl, a, ridge, i, j, max_iter)

    blocks = [(s, min(P, s + chunk)) for s in range(0, P, chunk)]
    if threads <= 1 or len(blocks) == 1:
        for b in blocks:
            work(b)
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="newton") as pool:
            list(pool.map(work, blocks))
    return np.ascontiguousarray(theta.T), status


def warm_up() -> None:
    """Load (or, in a fresh install, compile) the solver with a one-problem solve."""
    K = 3
    obj = Objective(1.0, np.full((3, 1), 0.5), np.full((3, 1), 0.5), np.zeros(1, np.int64),
                    ridge=1e-3, kl_coef=np.ones(1), log_ref=np.zeros((K, 1)))
    theta, _ = solve(obj, np.zeros((K, 1)))
    values(obj, theta)
