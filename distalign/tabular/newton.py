"""Batched damped Newton for the tabular objectives (SPEC (4)/(5), (6), (9), (10), (12)).

Every iterative objective of the toy has, per context, the form

    F(θ) = Σ_ij W_ij ψ(θ_i − θ_j; e_ij) + c · KL(softmax θ ‖ π₀) + ρ/2 · ‖P(θ − anchor)‖²

with θ ∈ ℝ^K a logit vector, ψ a pairwise library loss from ``distalign.objectives`` evaluated on
one pair, W the pair weights (counts / n, or μ(i)μ(j) for exact expectations) and P the centring
projection. All pairwise losses of the paper depend on the two log-probabilities only through
their difference, in which the log-normaliser cancels; so ψ sees d = θ_i − θ_j.

Why Newton: K is small (10), so a K×K solve per problem is cheap, and thousands of problems
(seeds × β grid × contexts × {full, train} fits × sizes n) are solved at once as one batched
tensor program. The library function defines ψ. Autograd through it costs 6–16 µs per problem
and iteration, most of the toy's time, so each solver also gives ψ, ψ', ψ'' in closed form
(:class:`ClosedForm`). They are checked against the library function (value, and autograd's
first and second derivatives) at the start of every solve, on the solve's own pair values,
and a mismatch raises. Without a closed form the derivatives come from autograd.
The chain rule through the linear map θ ↦ θ_i − θ_j is assembled by hand. Softmax logits
have a shift gauge; the steps are kept in the centred subspace.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.func import vmap

from distalign.objectives import kl_penalty

PairFn = Callable[..., Tensor]
MAX_STEP = 8.0
NEAR = 1e-6  # below this Newton decrement the full step is taken without a line search
QUADRATIC = 1e-12  # Newton decrement below which one more step converges (see newton_solve)
SLAB = 8192  # problems per slab of newton_solve: ~6 MB per pair table, cache-sized
CHECK_PAIRS = 256  # pair values on which closed-form ψ, ψ', ψ'' are checked against the library


class PairDerivativeError(AssertionError):
    """A closed-form pair term disagrees with the ``distalign.objectives`` function."""


def exact_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) = E_p[ln p − ln q] over the last axis, written with the k1 estimator."""
    p = log_p.exp()
    return torch.where(p > 0, p * kl_penalty(log_p, log_q, "k1"), torch.zeros_like(p)).sum(-1)


def _kl_logits(theta: Tensor, log_ref: Tensor) -> Tensor:
    return exact_kl(torch.log_softmax(theta, -1), log_ref)


def pair_index(K: int, ordered: bool = True, device: str | torch.device = "cpu") -> Tensor:
    """Index pairs ``[2, M]``: all ordered i ≠ j (M = K(K−1)) or only i < j (M = K(K−1)/2).

    Same-response pairs carry no information (every pairwise loss depends on θ_i − θ_j = 0).
    """
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    keep = (i != j) if ordered else (i < j)
    return torch.stack([i[keep], j[keep]]).to(device)


def gather_pairs(table: Tensor, pairs: Tensor) -> Tensor:
    """``table[..., i, j]`` for each pair: ``[..., K, K]`` → ``[..., M]``."""
    return table[..., pairs[0], pairs[1]]


def library_derivatives(pair_fn: PairFn, d: Tensor, *extras: Tensor) -> tuple[Tensor, ...]:
    """ψ, ψ', ψ'' of each element by autograd through the library call (two backward passes).

    The library losses are plain means of per-pair terms, so ``numel · loss`` is Σ_m ψ(d_m)
    and its gradient is ψ'(d_m) element by element; the gradient of Σ_m ψ'(d_m) is ψ''.
    """
    d = d.detach().requires_grad_(True)
    with torch.enable_grad():
        total = pair_fn(d, *extras) * d.numel()
        (d1,) = torch.autograd.grad(total, d, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), d)
    psi = vmap(pair_fn)(*(t.reshape(-1) for t in (d.detach(), *extras))).reshape(d.shape)
    return psi, d1.detach(), d2


def _same_extras(*extras: Tensor) -> tuple[Tensor, ...]:
    return extras


@dataclass(frozen=True)
class ClosedForm:
    """A pair term ψ(d; extras) and its derivatives in d, written out for speed.

    ``prepare(*extras)`` turns the pair extras into the constants ``value(d, *consts)`` and
    ``derivs(d, *consts) → (ψ', ψ'')`` use (once per solve, e.g. a target's entropy).
    """

    value: Callable[..., Tensor]
    derivs: Callable[..., tuple[Tensor, Tensor]]
    prepare: Callable[..., tuple[Tensor, ...]] = _same_extras


def check_closed_form(pair_fn: PairFn, closed: ClosedForm, d: Tensor, *extras: Tensor) -> None:
    """Raise :class:`PairDerivativeError` unless ``closed`` reproduces the library function.

    Checked on the given pair values (a solve's own, at its start) and on a fixed grid of
    differences, so a change in ``distalign.objectives`` cannot silently desync the solver.
    """
    d, *extras = (t.reshape(-1)[:CHECK_PAIRS] for t in torch.broadcast_tensors(d, *extras))
    grid = torch.linspace(-30.0, 30.0, 61, dtype=d.dtype, device=d.device)
    m = min(grid.numel(), d.numel()) if d.numel() else 0
    d = torch.cat([d, grid[:m]])
    extras = [torch.cat([e, e[:m]]) for e in extras]
    want = library_derivatives(pair_fn, d, *extras)
    consts = closed.prepare(*extras)
    got = (closed.value(d, *consts), *closed.derivs(d, *consts))
    for name, w, g in zip(("ψ", "ψ'", "ψ''"), want, got, strict=True):
        err = (w - g).abs() / (1 + w.abs())
        if not bool((err <= 1e-9).all()):
            raise PairDerivativeError(
                f"closed-form {name} of {getattr(pair_fn, '__qualname__', pair_fn)} differs "
                f"from the library by {float(err.max()):.2e}"
            )


@dataclass
class PairwiseObjective:
    """F(θ) above for a batch of problems; θ has shape ``[..., K]``.

    ``pairs`` (``[2, M]``, see :func:`pair_index`) lists the pairs (i, j) that enter the sum;
    ``weight`` and each of ``extras`` broadcast to ``[..., M]``; ``kl_coef`` and ``ridge``
    to ``[...]``; ``log_ref`` and ``anchor`` to ``[..., K]``. ``pair_fn(d, *extras,
    weight=None)`` calls a ``distalign.objectives`` loss on pair tensors and returns its
    (weighted) mean Σ w ψ / Σ w, exactly as the library defines it. ``weighted`` says
    whether it honours ``weight``; if not, values are computed one pair at a time (vmap).
    ``closed`` optionally gives ψ, ψ', ψ'' in closed form (checked against ``pair_fn`` by
    :func:`newton_solve`); without it autograd through ``pair_fn`` is used.
    """

    pair_fn: PairFn
    pairs: Tensor
    weight: Tensor
    extras: tuple[Tensor, ...] = ()
    kl_coef: Tensor | float | None = None
    log_ref: Tensor | None = None
    ridge: Tensor | float = 0.0
    anchor: Tensor | None = None
    weighted: bool = True
    closed: ClosedForm | None = None
    #: ``closed.prepare(*extras)`` once flattened
    consts: tuple[Tensor, ...] = ()

    #: True once :meth:`flatten` has laid the pair fields out as dense ``[N, K, K]`` tables
    flat: bool = False

    def flatten(self, batch: torch.Size, K: int) -> PairwiseObjective:
        """Materialise every field for each of the ``prod(batch)`` problems (axis 0).

        Pair fields become dense ``[N, K, K]`` tables (entry (i, j) of pair (i, j), zero
        weight elsewhere): the derivative assembly is then a few dense ops per problem,
        with no gathers or scatters. Zero-weight entries add exactly 0 to F, g and H.
        """
        M = self.pairs.shape[1]
        dev = self.weight.device
        cell = self.pairs[0] * K + self.pairs[1]

        def full(t: Tensor | float | None, tail: tuple[int, ...]) -> Tensor | None:
            if t is None:
                return None
            t = torch.as_tensor(t, dtype=torch.float64, device=dev)
            return t.expand(*batch, *tail).reshape(-1, *tail)

        def dense(t: Tensor) -> Tensor:
            flat = full(t, (M,))
            out = torch.zeros(flat.shape[0], K * K, dtype=flat.dtype, device=dev)
            return out.index_copy_(1, cell, flat).reshape(-1, K, K)

        # constants from the pair-form extras, before they are broadcast over the batch
        consts = self.closed.prepare(*self.extras) if self.closed is not None else ()
        return replace(
            self,
            weight=dense(self.weight),
            extras=tuple(dense(e) for e in self.extras),
            consts=tuple(dense(c) for c in consts),
            kl_coef=full(self.kl_coef, ()),
            log_ref=full(self.log_ref, (K,)),
            ridge=full(self.ridge, ()),
            anchor=full(self.anchor, (K,)),
            flat=True,
        )

    def subset(self, idx: Tensor) -> PairwiseObjective:
        """The problems ``idx`` of a flattened objective."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        assert self.flat, "subset() needs a flattened objective"
        return replace(
            self,
            weight=self.weight[idx],
            extras=tuple(e[idx] for e in self.extras),
            consts=tuple(c[idx] for c in self.consts),
            kl_coef=pick(self.kl_coef),
            log_ref=pick(self.log_ref),
            ridge=pick(self.ridge),
            anchor=pick(self.anchor),
        )

    # ---- pieces -----------------------------------------------------------------------
    def _flat_call(self, theta: Tensor, method: str) -> tuple[Tensor, ...]:
        """Evaluate ``method`` on a not yet flattened objective (θ carries the full batch)."""
        batch, K = theta.shape[:-1], theta.shape[-1]
        out = getattr(self.flatten(batch, K), method)(theta.reshape(-1, K))
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.reshape(*batch, *o.shape[1:]) for o in out)

    @staticmethod
    def _diff(theta: Tensor) -> Tensor:
        """d_ij = θ_i − θ_j for every cell of the ``[N, K, K]`` pair tables."""
        return theta[:, :, None] - theta[:, None, :]

    def _centred_dev(self, theta: Tensor) -> Tensor:
        dev = theta if self.anchor is None else theta - self.anchor
        return dev - dev.mean(-1, keepdim=True)

    def check(self, theta: Tensor) -> None:
        """Check the closed form against the library on θ's weighted pairs."""
        if self.closed is not None:
            used = self.weight != 0
            d = self._diff(theta)[used]
            check_closed_form(self.pair_fn, self.closed, d, *(e[used] for e in self.extras))

    def value(self, theta: Tensor) -> Tensor:
        """F(θ) per problem, shape ``[...]`` (used by the line search)."""
        if not self.flat:
            return self._flat_call(theta, "value")[0]
        d = self._diff(theta)
        fn = self.pair_fn
        if self.closed is not None:
            out = (self.weight * self.closed.value(d, *self.consts)).sum((-1, -2))
        elif self.weighted:
            # one library call per problem: Σ_m W_m ψ_m = (weighted mean) · Σ W
            def per_problem(d_p: Tensor, w_p: Tensor, *e_p: Tensor) -> Tensor:
                return fn(d_p, *e_p, weight=w_p) * w_p.sum()

            out = vmap(per_problem)(d, self.weight, *self.extras)
        else:
            shape = d.shape
            psi = vmap(fn)(*(t.reshape(-1) for t in (d, *self.extras))).reshape(shape)
            out = (self.weight * psi).sum((-1, -2))
        if self.kl_coef is not None:
            out = out + self.kl_coef * _kl_logits(theta, self.log_ref)
        dev = self._centred_dev(theta)
        return out + 0.5 * self.ridge * (dev * dev).sum(-1)

    def grad_hess(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient ``[..., K]`` and Hessian ``[..., K, K]`` of F at θ.

        ψ' and ψ'' come from ``closed`` or else from autograd through the library call.
        """
        if not self.flat:
            g, H = self._flat_call(theta, "grad_hess")
            return g, H
        d = self._diff(theta)
        if self.closed is not None:
            d1, d2 = self.closed.derivs(d, *self.consts)
        else:
            d1, d2 = library_derivatives_grad(self.pair_fn, d, *self.extras)
        # chain rule through d_ij = θ_i − θ_j: g_i += Wψ', g_j −= Wψ'; with A = Wψ'' the
        # Hessian is the weighted graph Laplacian of A + Aᵀ
        s1 = self.weight * d1
        g = s1.sum(-1) - s1.sum(-2)
        A = self.weight * d2
        H = A + A.transpose(-1, -2)
        diag = H.sum(-1)
        H.neg_()
        if self.kl_coef is not None:
            # c·H_KL = c·(diag(g_KL + p) − p uᵀ − u pᵀ), u = g_KL + p/2 (see kl_grad_hess),
            # added in place: two fused K×K updates instead of four K×K temporaries
            gk, p, u = _kl_pieces(theta, self.log_ref)
            c = self.kl_coef[:, None]
            g = g + c * gk
            cp = c * p
            H.addcmul_(cp[:, :, None], u[:, None, :], value=-1.0)
            H.addcmul_(u[:, :, None], cp[:, None, :], value=-1.0)
            diag = diag + c * (gk + p)
        # ridge·(I − 11ᵀ/K) on the centred logits
        r = self.ridge[:, None]
        H.sub_((r / theta.shape[-1])[..., None])
        H.diagonal(dim1=-2, dim2=-1).add_(diag + r)
        g = g + r * self._centred_dev(theta)
        return g, H


def library_derivatives_grad(pair_fn: PairFn, d: Tensor, *extras: Tensor) -> tuple[Tensor, ...]:
    """ψ', ψ'' by autograd through the library call (see :func:`library_derivatives`)."""
    d = d.detach().requires_grad_(True)
    with torch.enable_grad():
        total = pair_fn(d, *extras) * d.numel()
        (d1,) = torch.autograd.grad(total, d, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), d)
    return d1.detach(), d2


def _kl_pieces(theta: Tensor, log_ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """g = ∇_θ KL(softmax θ ‖ π₀), p = softmax θ and u = g + p/2 (see :func:`kl_grad_hess`)."""
    log_p = torch.log_softmax(theta, -1)
    p = log_p.exp()
    h = log_p - log_ref
    g = p * (h - (p * h).sum(-1, keepdim=True))
    return g, p, g + 0.5 * p


def kl_grad_hess(theta: Tensor, log_ref: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient and Hessian in the logits θ of KL(softmax θ ‖ π₀) (checked against autograd).

    With p = softmax θ, h = ln p − ln π₀ and k = E_p h = KL: g = p ⊙ (h − k) and
    H = diag(g + p) − p gᵀ − g pᵀ − p pᵀ. H is not PSD far from π₀: the KL is convex in p,
    not in the logits.
    """
    g, p, u = _kl_pieces(theta, log_ref)
    # p gᵀ + g pᵀ + p pᵀ = p uᵀ + u pᵀ with u = g + p/2: one outer product instead of three
    outer = p[..., :, None] * u[..., None, :]
    H = -(outer + outer.transpose(-1, -2))
    H.diagonal(dim1=-2, dim2=-1).add_(g + p)  # in place: no K×K diag_embed temporary
    return g, H


def _newton_step(g: Tensor, H: Tensor) -> Tensor:
    """Solve (H + c·11ᵀ/K) s = −g in the centred subspace; clip indefinite curvature."""
    K = g.shape[-1]
    g = g - g.mean(-1, keepdim=True)  # F is shift-invariant; remove rounding drift
    scale = H.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-300)
    ones = torch.full((K, K), 1.0 / K, dtype=H.dtype, device=H.device)
    Hs = H + scale[..., None, None] * ones
    L, info = torch.linalg.cholesky_ex(Hs)
    step = -torch.cholesky_solve(g[..., None], L)[..., 0]
    bad = info > 0
    if bool(bad.any()):
        # non-convex region (the KL term is not convex in logits): |eigenvalues| (Nocedal–Wright)
        evals, evecs = torch.linalg.eigh(Hs[bad])
        # floor relative to the largest curvature: a near-flat direction must not get a step
        # of 1e12 (the trust cap in newton_solve would then waste the iteration)
        evals = evals.abs().clamp_min(1e-6 * evals.abs().amax(-1, keepdim=True))
        coef = (evecs.transpose(-1, -2) @ g[bad][..., None])[..., 0] / evals
        step[bad] = -(evecs @ coef[..., None])[..., 0]
    return step - step.mean(-1, keepdim=True)


def newton_solve(
    objective: PairwiseObjective,
    theta0: Tensor,
    max_iter: int = 100,
    tol: float = 1e-22,
    slab: int = SLAB,
) -> tuple[Tensor, dict[str, float]]:
    """Minimise ``objective`` from ``theta0`` (``[..., K]``) for every problem at once.

    The batch is cut along its leading axes into slabs of at most ``slab`` problems, each
    solved by :func:`_newton_flat`: a slab's tensors stay in cache, where the elementwise
    work runs several times faster than on one huge stack. Problems are independent, so the
    result does not depend on the cut.
    """
    batch, K = theta0.shape[:-1], theta0.shape[-1]
    lead, size = 0, math.prod(batch)
    while lead < len(batch) - 1 and size > slab:
        size //= batch[lead]
        lead += 1
    theta = torch.empty_like(theta0)
    stats = {"iterations": 0.0, "unconverged": 0.0, "stalled": 0.0, "work": 0.0}
    for idx in itertools.product(*(range(b) for b in batch[:lead])):
        part = _slab_objective(objective, idx, len(batch))
        th, st = _newton_flat(part.flatten(batch[lead:], K), theta0[idx].reshape(-1, K),
                              max_iter, tol, check=not any(idx))  # check on the first slab
        theta[idx] = th.reshape(*batch[lead:], K)
        stats["iterations"] = max(stats["iterations"], st["iterations"])
        for key in ("unconverged", "stalled", "work"):
            stats[key] += st[key]
    return theta, stats


def objective_value(objective: PairwiseObjective, theta: Tensor, slab: int = SLAB) -> Tensor:
    """F(θ) for every problem of ``theta`` (``[..., K]`` → ``[...]``), slab by slab."""
    batch, K = theta.shape[:-1], theta.shape[-1]
    lead, size = 0, math.prod(batch)
    while lead < len(batch) - 1 and size > slab:
        size //= batch[lead]
        lead += 1
    out = theta.new_empty(batch)
    for idx in itertools.product(*(range(b) for b in batch[:lead])):
        part = _slab_objective(objective, idx, len(batch)).flatten(batch[lead:], K)
        out[idx] = part.value(theta[idx].reshape(-1, K)).reshape(batch[lead:])
    return out


def _slab_objective(obj: PairwiseObjective, idx: tuple[int, ...], nbatch: int) -> PairwiseObjective:
    """The objective of the problems ``[*idx, ...]``; fields broadcast against the batch."""

    def cut(t: Tensor | float | None, tail: int) -> Tensor | float | None:
        if not isinstance(t, Tensor):
            return t
        t = t.reshape((1,) * (nbatch + tail - t.ndim) + tuple(t.shape))
        for i in idx:
            t = t[i if t.shape[0] > 1 else 0]
        return t

    return replace(
        obj,
        weight=cut(obj.weight, 1),
        extras=tuple(cut(e, 1) for e in obj.extras),
        kl_coef=cut(obj.kl_coef, 0),
        log_ref=cut(obj.log_ref, 1),
        ridge=cut(obj.ridge, 0),
        anchor=cut(obj.anchor, 1),
    )


def _newton_flat(
    obj_all: PairwiseObjective,
    theta0: Tensor,
    max_iter: int,
    tol: float,
    check: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Damped Newton on a flattened objective from ``theta0`` (``[N, K]``).

    A problem stops when its Newton decrement gᵀH⁻¹g is below ``tol``, or below QUADRATIC
    (then one last full step is taken: Newton converges quadratically), or when it has
    stalled at rounding level. Later iterations run on the still active problems only.
    Steps are capped at MAX_STEP per logit; far from the optimum (decrement > NEAR) an
    Armijo backtracking line search with quadratic interpolation guards them. The loops are
    over iterations and step sizes, never over problems.

    ``max_iter`` caps the work. The slowest problems in the toy are corner solutions of tiny β
    on separable small-n data, where a never-winning response walks towards probability 0,
    held only by the ridge; they converge slowly, typically within 50 iterations.
    Their count is returned as ``stats["unconverged"]``.
    """
    theta = theta0.clone()
    if check:
        obj_all.check(theta)
    if obj_all.closed is not None:  # the extras only served the check: stop copying them
        obj_all = replace(obj_all, extras=())
    active = torch.arange(theta.shape[0], device=theta.device)
    obj = obj_all
    F = torch.full((theta.shape[0],), float("nan"), dtype=theta.dtype, device=theta.device)
    dec_prev = torch.full_like(F, float("inf"))
    it, work, n_stalled = 0, 0, 0
    for it in range(1, max_iter + 1):  # noqa: B007 - ``it`` is reported below
        th = theta[active]
        work += th.shape[0]
        g, H = obj.grad_hess(th)
        step = _newton_step(g, H)
        dec = -(g * step).sum(-1)
        # Stalled: non-convex, nearly flat corners (a response pushed towards probability 0,
        # held only by the tiny ridge) stop improving at rounding level; in the quadratic
        # regime dec would instead collapse (dec_k+1 ~ dec_k²).
        stalled = (dec < 1e-12) & (dec > 0.25 * dec_prev)
        n_stalled += int(stalled.sum())
        # In the quadratic regime one more full step makes θ exact to ~dec; take it and retire.
        final = (dec < QUADRATIC) & ~stalled
        theta[active[final]] = th[final] + step[final]
        live = (dec >= tol) & ~final & ~stalled
        if not bool(live.all()):  # drop finished problems before doing more work on them
            active, th, step, F = active[live], th[live], step[live], F[live]
            g, dec = g[live], dec[live]
            obj = obj.subset(live.nonzero()[:, 0])
        if active.numel() == 0:
            break
        # trust cap: no logit moves by more than MAX_STEP in one iteration (flat, saturated
        # regions give huge Newton steps; the line search would spend many halvings on them)
        step = step * (MAX_STEP / step.abs().amax(-1).clamp_min(MAX_STEP))[..., None]
        # Near the optimum (small decrement) the full Newton step is taken without paying for
        # loss values; farther out, Armijo backtracking on the values of those problems only.
        far = (dec > NEAR).nonzero()[:, 0]
        new_th = th + step
        F_new = torch.full_like(F, float("nan"))
        if far.numel():
            sub = obj.subset(far)
            th_f, step_f = th[far], step[far]
            F_f = F[far]
            missing = F_f.isnan()
            if bool(missing.any()):
                F_f[missing] = sub.subset(missing.nonzero()[:, 0]).value(th_f[missing])
            slope = -(g[far] * step_f).sum(-1)
            t = torch.ones_like(slope)
            trial = th_f + step_f
            F_trial = sub.value(trial)
            for _ in range(30):
                ok = F_trial <= F_f - 1e-4 * t * slope
                if bool(ok.all()):
                    break
                # minimiser of the quadratic through F(0), F'(0) and F(t), kept in [t/10, t/2]
                curv = (F_trial - F_f + t * slope).clamp_min(1e-300)
                t_q = (slope * t * t / (2 * curv)).clamp(0.1 * t, 0.5 * t)
                t = torch.where(ok, t, t_q)
                trial = torch.where(ok[..., None], trial, th_f + t[..., None] * step_f)
                F_trial = torch.where(ok, F_trial, sub.value(trial))
            ok = F_trial <= F_f
            new_th[far] = torch.where(ok[..., None], trial, th_f)
            F_new[far] = torch.where(ok, F_trial, F_f)
        theta[active] = new_th
        F = F_new
        dec_prev = dec
    stats = {
        "iterations": float(it),
        "unconverged": float(active.numel()),
        "stalled": float(n_stalled),
        "work": float(work),
    }
    return theta, stats
