"""The toy's damped Newton: its constants and stopping rules, defined once.

Three engines take the same steps, so they must read the same numbers: the torch reference
(:mod:`.reference.newton`), numpy's solver (:mod:`.fast.newton`) and the compiled one
(``fast/_newton.c``), which receives them on every call as a ``newton_rules`` struct
(:func:`distalign.tabular.fast.compiled.c_rules`) rather than through a header generated at
build time: a built extension can then never run with other rules than the Python engines.
"""

from __future__ import annotations

#: iterations per problem; the slowest toy problems (corner solutions of tiny β on separable
#: small-n data, held only by the ridge) converge within about 50
MAX_ITER = 100
#: a Newton decrement gᵀH⁻¹g below this is converged (the default ``tol`` of the solvers)
TOL = 1e-22
#: below this decrement Newton is in its quadratic regime: one last full step makes θ exact to
#: ~decrement, so it is taken and the problem retires
QUADRATIC = 1e-12
#: below this decrement the full step is taken without a line search (no loss values needed)
NEAR = 1e-6
#: trust cap: no logit moves by more than this in one iteration (flat, saturated regions give
#: huge Newton steps, and the line search would spend many reductions on them)
MAX_STEP = 8.0
#: stalled at rounding level: a decrement below STALL_DECREMENT that fell by less than a factor
#: 1/STALL_RATIO since the last iteration (in the quadratic regime it would square instead);
#: non-convex, nearly flat corners, a response pushed towards probability 0, stop there
STALL_DECREMENT = 1e-12
STALL_RATIO = 0.25
#: Armijo's sufficient decrease: F(θ + t·s) ≤ F(θ) − ARMIJO·t·(−gᵀs)
ARMIJO = 1e-4
#: at most this many step reductions per line search
BACKTRACKS = 30
#: each reduction moves t to the minimiser of the quadratic through F(0), F'(0) and F(t),
#: kept within [SHRINK_MIN·t, SHRINK_MAX·t]
SHRINK_MIN = 0.1
SHRINK_MAX = 0.5
#: where the Hessian is indefinite (the KL is not convex in the logits) the step uses
#: |eigenvalues|, floored at EIG_FLOOR × the largest so that a near-flat direction does not get
#: a step of 1e12 (the trust cap would then waste the iteration)
EIG_FLOOR = 1e-6
#: floor of the divisors (the Hessian's scale, the line search's curvature)
TINY = 1e-300
#: the compiled eigen-solver gives up after this many QL sweeps for one eigenvalue, and numpy's
#: solver takes the problem (LAPACK's dsteqr allows 30)
QL_SWEEPS = 60
#: two starts whose centred logits end closer than this found the same optimum
SAME_POINT = 1e-9
#: problems per slab (torch) or working set (numpy): the [K, K, SLAB] Hessians (6.5 MB for
#: K = 10) stay in cache, where the elementwise work runs several times faster
SLAB = 8192

#: how a problem's solve ended (``status`` of the numpy and compiled solvers)
CONVERGED, STALLED, UNCONVERGED = 0, 1, 2
#: the compiled solver only: its eigen-solver gave up on the problem, which numpy's solver
#: (LAPACK's eigh) then solves instead
FAILED = 3
