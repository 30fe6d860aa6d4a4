"""The pairwise objectives of the tabular world, their values, gradients and Hessians.

Every iterative objective of the toy has, per context, the form

    F(θ) = Σ_ij W_ij ψ(θ_i − θ_j; e_ij) + c · KL(softmax θ ‖ π₀) + ρ/2 · ‖P(θ − anchor)‖²

with θ ∈ ℝ^K a logit vector, ψ a pairwise library loss from ``distalign.objectives`` evaluated on
one pair, W the pair weights (counts / n, or μ(i)μ(j) for exact expectations) and P the centring
projection. All pairwise losses of the paper depend on the two log-probabilities only through
their difference, in which the log-normaliser cancels; so ψ sees d = θ_i − θ_j.

The library function defines ψ. Autograd through it costs 6–16 µs per problem and Newton
iteration, most of the toy's time, so each solver also gives ψ, ψ', ψ'' in closed form
(:class:`ClosedForm`). :func:`.newton.newton_solve` checks them against the
library function (value, and autograd's first and second derivatives) on the solve's own pair
values before its first step, and a mismatch raises. Without a closed form the derivatives
come from autograd. The chain rule through the linear map θ ↦ θ_i − θ_j is assembled by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.func import vmap

from distalign.objectives import kl_penalty

PairFn = Callable[..., Tensor]
CHECK_PAIRS = 256  # pair values on which closed-form ψ, ψ', ψ'' are checked against the library


class PairDerivativeError(AssertionError):
    """A closed-form pair term disagrees with the ``distalign.objectives`` function."""


def exact_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) = E_p[ln p − ln q] over the last axis, written with the k1 estimator."""
    p = log_p.exp()
    return torch.where(p > 0, p * kl_penalty(log_p, log_q, "k1"), torch.zeros_like(p)).sum(-1)


def _kl_logits(theta: Tensor, log_ref: Tensor) -> Tensor:
    return exact_kl(_log_softmax(theta), log_ref)


def _log_softmax(theta: Tensor) -> Tensor:
    """log_softmax over a short last axis: torch's kernel is ~3× slower on ``[N, 10]``."""
    z = theta - theta.amax(-1, keepdim=True)
    return z - z.exp().sum(-1, keepdim=True).log()


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

    #: True once :meth:`flatten` has laid the pair fields out as ``[N, M]`` arrays
    flat: bool = False
    #: incidence matrix ``[K, M]`` (+1 at i, −1 at j for pair (i, j)), set by :meth:`flatten`
    incidence: Tensor | None = None
    #: no two listed pairs fill the same Hessian cell (e.g. only i < j), set by :meth:`flatten`
    pairs_unordered: bool = False

    def flatten(self, batch: torch.Size, K: int) -> PairwiseObjective:
        """Materialise every field for each of the ``prod(batch)`` problems (axis 0).

        Pair fields become ``[N, M]`` arrays over the M listed pairs only (45 unordered pairs
        for K = 10, against 100 cells of a dense K×K table). Differences and the gradient are
        one matrix product with the incidence matrix each; the Hessian one scatter.
        """
        M = self.pairs.shape[1]
        dev = self.weight.device

        def full(t: Tensor | float | None, tail: tuple[int, ...]) -> Tensor | None:
            if t is None:
                return None
            t = torch.as_tensor(t, dtype=torch.float64, device=dev)
            return t.expand(*batch, *tail).reshape(-1, *tail)

        cells = torch.cat([self.pairs[0] * K + self.pairs[1], self.pairs[1] * K + self.pairs[0]])
        inc = torch.zeros(K, M, dtype=torch.float64, device=dev)
        cols = torch.arange(M, device=dev)
        inc[self.pairs[0], cols] = 1.0
        inc[self.pairs[1], cols] = -1.0
        # constants from the pair-form extras, before they are broadcast over the batch
        consts = self.closed.prepare(*self.extras) if self.closed is not None else ()
        return replace(
            self,
            weight=full(self.weight, (M,)),
            extras=tuple(full(e, (M,)) for e in self.extras),
            consts=tuple(full(c, (M,)) for c in consts),
            kl_coef=full(self.kl_coef, ()),
            log_ref=full(self.log_ref, (K,)),
            ridge=full(self.ridge, ()),
            anchor=full(self.anchor, (K,)),
            flat=True,
            incidence=inc,
            pairs_unordered=bool(torch.unique(cells).numel() == cells.numel()),
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

    def _diff(self, theta: Tensor) -> Tensor:
        """d = θ_i − θ_j for every pair, ``[N, M]`` (exact: the other products are 0)."""
        return theta @ self.incidence

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
            out = (self.weight * self.closed.value(d, *self.consts)).sum(-1)
        elif self.weighted:
            # one library call per problem: Σ_m W_m ψ_m = (weighted mean) · Σ W
            def per_problem(d_p: Tensor, w_p: Tensor, *e_p: Tensor) -> Tensor:
                return fn(d_p, *e_p, weight=w_p) * w_p.sum()

            out = vmap(per_problem)(d, self.weight, *self.extras)
        else:
            shape = d.shape
            psi = vmap(fn)(*(t.reshape(-1) for t in (d, *self.extras))).reshape(shape)
            out = (self.weight * psi).sum(-1)
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
        # chain rule through d = θ_i − θ_j: g_i += Wψ', g_j −= Wψ'; with A = Wψ'' per pair the
        # Hessian is the weighted graph Laplacian: −A at (i, j) and (j, i), Σ A on the diagonal
        inc = self.incidence
        g = (self.weight * d1) @ inc.T
        A = self.weight * d2
        N, K = theta.shape
        i, j = self.pairs[0], self.pairs[1]
        cells = torch.cat([i * K + j, j * K + i])
        H = theta.new_zeros(N, K * K)
        if self.pairs_unordered:  # every cell is written once: a copy, faster than an add
            H.index_copy_(1, cells, torch.cat([A, A], 1).neg_())
        else:  # pairs (i, j) and (j, i) share cells
            H.index_add_(1, cells, torch.cat([A, A], 1), alpha=-1.0)
        H = H.view(N, K, K)
        diag = A @ inc.abs().T
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
    log_p = _log_softmax(theta)
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
