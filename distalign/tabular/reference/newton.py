"""Batched damped Newton for the tabular objectives (paper eqs. (4)/(5), (6), (9), (10), (12)).

Why Newton: K is small (10), so a K×K solve per problem is cheap, and thousands of problems
(seeds × β grid × contexts × {full, train} fits × sizes n) are solved at once as one batched
tensor program. The objectives are :class:`~distalign.tabular.reference.pairwise.PairwiseObjective`.
Softmax logits have a shift gauge; the steps are kept in the centred subspace. The constants and
stopping rules are those of :mod:`distalign.tabular.rules`, shared with the numpy engine.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import torch
from torch import Tensor

from distalign.tabular import rules
from distalign.tabular.reference.pairwise import PairwiseObjective
from distalign.tabular.rules import MAX_STEP, QUADRATIC, SLAB


def _newton_step(g: Tensor, H: Tensor) -> Tensor:
    """Solve (H + c·11ᵀ/K) s = −g in the centred subspace; clip indefinite curvature."""
    K = g.shape[-1]
    g = g - g.mean(-1, keepdim=True)  # F is shift-invariant; remove rounding drift
    scale = H.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(rules.TINY)
    ones = torch.full((K, K), 1.0 / K, dtype=H.dtype, device=H.device)
    Hs = H + scale[..., None, None] * ones
    L, info = torch.linalg.cholesky_ex(Hs)
    step = -torch.cholesky_solve(g[..., None], L)[..., 0]
    bad = info > 0
    if bool(bad.any()):
        # non-convex region (the KL term is not convex in logits): |eigenvalues| (Nocedal–Wright)
        evals, evecs = torch.linalg.eigh(Hs[bad])
        # floor relative to the largest curvature (rules.EIG_FLOOR)
        evals = evals.abs().clamp_min(rules.EIG_FLOOR * evals.abs().amax(-1, keepdim=True))
        coef = (evecs.transpose(-1, -2) @ g[bad][..., None])[..., 0] / evals
        step[bad] = -(evecs @ coef[..., None])[..., 0]
    return step - step.mean(-1, keepdim=True)


def _slab_lead(batch: tuple[int, ...], slab: int) -> int:
    """How many leading axes of ``batch`` to loop over so that a slab holds ≤ ``slab``
    problems (or only the last axis is left)."""
    lead, size = 0, math.prod(batch)
    while lead < len(batch) - 1 and size > slab:
        size //= batch[lead]
        lead += 1
    return lead


def newton_solve(
    objective: PairwiseObjective,
    theta0: Tensor,
    max_iter: int = rules.MAX_ITER,
    tol: float = rules.TOL,
    slab: int = SLAB,
) -> tuple[Tensor, dict[str, float]]:
    """Minimise ``objective`` from ``theta0`` (``[..., K]``) for every problem at once.

    The batch is cut along its leading axes into slabs of at most ``slab`` problems, each
    solved by :func:`_newton_flat`: a slab's tensors stay in cache, where the elementwise
    work runs several times faster than on one huge stack. Problems are independent, so the
    result does not depend on the cut.
    """
    batch, K = theta0.shape[:-1], theta0.shape[-1]
    lead = _slab_lead(batch, slab)
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


def newton_decrement(objective: PairwiseObjective, theta: Tensor) -> tuple[Tensor, Tensor]:
    """The Newton step (``[..., K]``) and decrement gᵀH⁻¹g (``[...]``) at ``theta``, unsliced:
    for certificates on small batches (one problem per context)."""
    batch, K = theta.shape[:-1], theta.shape[-1]
    flat = objective.flatten(batch, K)
    g, H = flat.grad_hess(theta.reshape(-1, K))
    step = _newton_step(g, H)
    return step.reshape(theta.shape), (-(g * step).sum(-1)).reshape(batch)


def objective_value(
    objective: PairwiseObjective, theta: Tensor, slab: int = SLAB, where: Tensor | None = None
) -> Tensor:
    """F(θ) for every problem of ``theta`` (``[..., K]`` → ``[...]``), slab by slab; with a
    mask ``where`` (``[...]``) only there, 0 elsewhere."""
    batch, K = theta.shape[:-1], theta.shape[-1]
    lead = _slab_lead(batch, slab)
    out = theta.new_zeros(batch)
    for idx in itertools.product(*(range(b) for b in batch[:lead])):
        th = theta[idx].reshape(-1, K)
        sel = None if where is None else where[idx].reshape(-1).nonzero()[:, 0]
        if sel is not None and sel.numel() == 0:
            continue
        part = _slab_objective(objective, idx, len(batch)).flatten(batch[lead:], K)
        if sel is None:
            out[idx] = part.value(th).reshape(batch[lead:])
        else:
            vals = th.new_zeros(th.shape[0])
            vals[sel] = part.subset(sel).value(th[sel])
            out[idx] = vals.reshape(batch[lead:])
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
    Armijo backtracking line search with quadratic interpolation guards them (each constant
    is explained in :mod:`distalign.tabular.rules`). The loops are over iterations and step
    sizes, never over problems. The problems still running after ``max_iter`` iterations are
    counted as ``stats["unconverged"]``.
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
        stalled = (dec < rules.STALL_DECREMENT) & (dec > rules.STALL_RATIO * dec_prev)
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
        far = (dec > rules.NEAR).nonzero()[:, 0]
        new_th = th + step
        F_new = torch.full_like(F, float("nan"))
        if far.numel():
            # a subset copies every pair table: skip it when every problem is far (early on)
            sub = obj if far.numel() == th.shape[0] else obj.subset(far)
            th_f, step_f = th[far], step[far]
            F_f = F[far]
            missing = F_f.isnan()
            if bool(missing.any()):
                miss = sub if bool(missing.all()) else sub.subset(missing.nonzero()[:, 0])
                F_f[missing] = miss.value(th_f[missing])
            slope = -(g[far] * step_f).sum(-1)
            t = torch.ones_like(slope)
            trial = th_f + step_f
            F_trial = sub.value(trial)
            for _ in range(rules.BACKTRACKS):
                ok = F_trial <= F_f - rules.ARMIJO * t * slope
                if bool(ok.all()):
                    break
                # minimiser of the quadratic through F(0), F'(0) and F(t), kept in [t/10, t/2]
                curv = (F_trial - F_f + t * slope).clamp_min(rules.TINY)
                t_q = (slope * t * t / (2 * curv)).clamp(rules.SHRINK_MIN * t, rules.SHRINK_MAX * t)
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
