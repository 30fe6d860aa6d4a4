"""Exact metrics of a policy in the synthetic world, by enumerating 𝒳 × 𝒜 in batched forwards.

π̂ is an HF causal LM over *all* token strings, so it may put mass outside 𝒜 (no EOS within
``max_len``, or an empty response). Choices, all exact:

- ``kl_fwd`` = E_x KL(π*‖π̂) over all strings. π* is 0 outside 𝒜, so the sum over 𝒜 with the
  *sub-normalised* π̂ is the exact value (≥ 0 since Σ_𝒜 π̂ ≤ 1); leaking mass raises it.
- ``leak`` = E_x [1 − π̂(𝒜|x)], the mass π̂ puts outside 𝒜.
- ``kl_fwd_cond`` = E_x KL(π*‖π̂(·|𝒜)) = ``kl_fwd`` + E_x ln π̂(𝒜|x): the policy deployed with a
  format check (resample until the response is valid). The paper's policies are distributions
  on 𝒜, so this is the quantity its theorems bound; ``kl_fwd`` additionally charges the leak.
- ``kl_rev``, ``entropy`` and ``kl_ref`` use π̂ conditioned on 𝒜 (π̂/π̂(𝒜), likewise π₀):
  outside 𝒜 the reverse KL to π* is +∞ and the rest is not enumerable, so these describe the
  policy's shape on 𝒜 and ``leak`` reports the rest.
- ``log_mass`` = E_x ln π̂(𝒜|x), the log of the mass that passes a format check. It needs no π*
  (only the enumerated 𝒜) and is exactly the leak's share of the forward KL:
  ``kl_fwd`` = ``kl_fwd_cond`` − ``log_mass``; the leak-aware selection rule adds it to the
  held-out preference log-likelihood.
- ``obj_gap`` (on-policy runs, given R̂'s table): E_x KL(π̂(·|𝒜)‖π_T), π_T the method's own
  fixed point under R̂ (RLHF/REBEL: π₀·exp(R̂/β); RKL/distill: (π₀^β·exp(R̂))^{1/(β+γ)}). It is
  the run's objective suboptimality divided by its temperature, evaluated exactly over the
  prompt distribution rather than on training batches; its plateau is the convergence rule.
- ``win_ref`` / ``win_star``: the oracle win-rate Σ π̂(a) π₀(b) σ(γ Δ ln π*) of eq. (3),
  extended to all strings by the oracle's own rule: π*(a) = 0 outside 𝒜, so a valid response
  beats an invalid one with probability σ(+∞) = 1, and two invalid ones tie (½).

Every expectation over x is uniform over the world's prompts (the data are drawn that way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from distalign.lm.logprobs import sequence_logprobs
from distalign.lm.scoring import sequence_scores
from distalign.stats import rkl_logits, rlhf_logits
from distalign.synthetic.world import World


def encode_sequence(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS, the way the data pipeline builds them, and the
    prompt length. Plain text, no chat template, no BOS (the world tokenizer adds none)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    return [*p, *r, tokenizer.eos_token_id], len(p)


def exact_metrics(
    logp_hat: Tensor, logp_star: Tensor, gamma: float, logp_ref: Tensor | None = None
) -> dict[str, float]:
    """All exact metrics from enumerated ``[P, N]`` log-prob tables (see module docstring).

    ``logp_star`` must be normalised on 𝒜; ``logp_hat`` and ``logp_ref`` may be sub-normalised.
    """
    lq, ls = logp_hat.double(), logp_star.double()
    ps = ls.exp()
    mass_q = lq.exp().sum(-1)  # π̂(𝒜|x)
    qbar = lq - mass_q.log()[:, None]  # ln π̂(a|x, a ∈ 𝒜)
    pq = qbar.exp()
    out = {
        "kl_fwd": (ps * (ls - lq)).sum(-1).mean().item(),
        "kl_fwd_cond": (ps * (ls - qbar)).sum(-1).mean().item(),
        "kl_rev": (pq * (qbar - ls)).sum(-1).mean().item(),
        "entropy": -(pq * qbar).sum(-1).mean().item(),
        "leak": (1.0 - mass_q).mean().item(),
        "log_mass": mass_q.log().mean().item(),
        "win_star": _win_rate(lq, ls, ls, gamma),
    }
    if logp_ref is not None:
        lr = logp_ref.double()
        rbar = lr - lr.exp().sum(-1).log()[:, None]
        out["kl_ref"] = (pq * (qbar - rbar)).sum(-1).mean().item()
        out["win_ref"] = _win_rate(lq, lr, ls, gamma)
    return out


def reward_metrics(scores: Tensor, logp_star: Tensor, gamma: float) -> dict[str, float]:
    """Exact quality of a reward model R̂ through the LM it induces, π̃ ∝ exp(R̂/γ) on 𝒜
    (eq. (8) and the paper's preference simulator). ``rm_kl_fwd`` = E_x KL(π*‖π̃) is the error the
    on-policy methods inherit (Thm 6/7's C_ℛ term); ``rm_corr`` is the per-prompt Pearson
    correlation of R̂ with ln π*, averaged over prompts."""
    r, ls = scores.double(), logp_star.double()
    lt = torch.log_softmax(r / gamma, dim=-1)
    rc, sc = r - r.mean(-1, keepdim=True), ls - ls.mean(-1, keepdim=True)
    corr = (rc * sc).sum(-1) / (rc.norm(dim=-1) * sc.norm(dim=-1)).clamp_min(1e-12)
    return {
        "rm_kl_fwd": (ls.exp() * (ls - lt)).sum(-1).mean().item(),
        "rm_corr": corr.mean().item(),
    }


def fixed_point(
    method: str, params: dict[str, float], reward: Tensor, logp_ref: Tensor, gamma: float
) -> Tensor:
    """ln π_T on 𝒜 of an on-policy method's objective with reward table R̂ ``[P, N]``.

    RLHF (1) and REBEL (10): π_T ∝ π₀·exp(R̂/β). RKL (15) and distillation (11)–(12) with its
    KL-shaped reward: π_T ∝ π₀^{β/(β+γ)}·exp(R̂/(β+γ)) (β = 0: π̃ ∝ exp(R̂/γ)).
    """
    r, lr = reward.double(), logp_ref.double()
    beta = float(params.get("beta", 0.0))
    if method in ("rlhf", "rebel"):
        return torch.log_softmax(rlhf_logits(lr, r, beta), dim=-1)
    if method in ("rkl", "distill"):
        return torch.log_softmax(rkl_logits(lr, r, beta, gamma), dim=-1)
    raise ValueError(f"no fixed point for method {method!r}")


def objective_gap(logp_hat: Tensor, logp_target: Tensor) -> float:
    """E_x KL(π̂(·|𝒜)‖π_T): 0 exactly at the method's fixed point."""
    lq = logp_hat.double()
    qbar = lq - lq.exp().sum(-1).log()[:, None]
    return (qbar.exp() * (qbar - logp_target.double())).sum(-1).mean().item()


def _win_rate(lq: Tensor, lr: Tensor, ls: Tensor, gamma: float) -> float:
    """E_x P(a ≻ b), a ∼ π̂, b ∼ opponent, judged by the oracle preference model (3)."""
    q, r = lq.exp(), lr.exp()
    sig = torch.sigmoid(gamma * (ls[:, :, None] - ls[:, None, :]))  # [P, N, N]
    inside = torch.einsum("pa,pab,pb->p", q, sig, r)
    mq, mr = q.sum(-1), r.sum(-1)
    # valid beats invalid (π*(invalid) = 0); invalid vs invalid is a coin flip
    win = inside + mq * (1.0 - mr).clamp_min(0) + 0.5 * (1.0 - mq) * (1.0 - mr).clamp_min(0)
    return win.mean().item()


class ExactEvaluator:
    """Holds the P·N enumerated sequences of a world, tokenised once, and scores policies.

    ``policy_logprobs(model)`` runs ⌈P·N / chunk_size⌉ forwards (one for the default world) of
    ``distalign.lm.logprobs.sequence_logprobs`` and returns ln π̂(a|x) as ``[P, N]``;
    ``reward_scores`` does the same with ``distalign.lm.scoring.sequence_scores``.
    """

    def __init__(
        self,
        world: World,
        tokenizer: Any,
        logp_ref: Tensor | None = None,
        chunk_size: int = 8192,
    ) -> None:
        self.world = world
        self.tokenizer = tokenizer
        self.logp_star = world.logp_star()
        self.logp_ref = logp_ref
        self.chunk_size = chunk_size
        seqs = [
            encode_sequence(tokenizer, x, a) for x in world.prompts for a in world.responses
        ]
        width = max(len(s) for s, _ in seqs)
        n = len(seqs)
        self.input_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
        self.attention_mask = torch.zeros((n, width), dtype=torch.long)
        self.response_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (ids, plen) in enumerate(seqs):
            self.input_ids[i, : len(ids)] = torch.tensor(ids)
            self.attention_mask[i, : len(ids)] = 1
            self.response_mask[i, plen : len(ids)] = 1  # response tokens and the final EOS

    @torch.no_grad()
    def policy_logprobs(self, model: torch.nn.Module) -> Tensor:
        """ln π̂(a|x) for every prompt × enumerated response, ``[P, N]`` float64."""
        return self._table(model, sequence_logprobs)

    @torch.no_grad()
    def reward_scores(self, model: torch.nn.Module) -> Tensor:
        """R̂(x, a) of a scorer for every prompt × enumerated response, ``[P, N]``."""
        return self._table(model, sequence_scores)

    def _table(self, model: torch.nn.Module, score: Callable[..., Tensor]) -> Tensor:
        """``score(model, input_ids, attention_mask, response_mask) → [B]`` over every
        enumerated sequence in chunks, with dropout off, as a ``[P, N]`` float64 table."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = []
        try:
            for s in range(0, self.input_ids.shape[0], self.chunk_size):
                batch = (t[s : s + self.chunk_size].to(device)
                         for t in (self.input_ids, self.attention_mask, self.response_mask))
                out.append(score(model, *batch).double().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out).view(self.world.num_prompts, self.world.num_responses)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Exact policy metrics, or reward-model metrics when ``model`` is a scorer."""
        if is_scorer(model):
            return reward_metrics(self.reward_scores(model), self.logp_star, self.world.gamma)
        return exact_metrics(
            self.policy_logprobs(model), self.logp_star, self.world.gamma, self.logp_ref
        )


def is_scorer(model: torch.nn.Module) -> bool:
    """A sequence scorer (reward/value model) has no LM head."""
    return model.get_output_embeddings() is None


class ExactMetricsCallback:
    """Engine callback: merges the exact metrics into ``metrics.jsonl`` at every evaluation.

    Keys are prefixed with ``synthetic/`` (e.g. ``synthetic/kl_fwd``) so that ``report`` can
    pick them out. With ``val_pairs`` it also logs ``synthetic/val_pref_loglik``, the held-out
    preference log-likelihood used for model selection (``labels.preference_loglik``; for a
    reward model, ln σ(R̂(a⁺) − R̂(a⁻))). It needs the pairs' labels only, never π*.
    """

    def __init__(
        self,
        evaluator: ExactEvaluator,
        val_pairs: Any = None,
        prefix: str = "synthetic/",
        target: Tensor | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.val_pairs = val_pairs
        self.target = target  # ln π_T of ``fixed_point``: adds ``obj_gap``
        self.prefix = prefix
        self.history: list[dict[str, float]] = []

    def on_evaluate(self, step: int, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        ev, world = self.evaluator, self.evaluator.world
        if is_scorer(model):
            table = ev.reward_scores(model)
            metrics = reward_metrics(table, ev.logp_star, world.gamma)
            scale = 1.0  # BT on R̂ directly: the tilt is absorbed in the reward's scale
        else:
            table = ev.policy_logprobs(model)
            metrics = exact_metrics(table, ev.logp_star, world.gamma, ev.logp_ref)
            scale = world.gamma
            if self.target is not None:
                metrics["obj_gap"] = objective_gap(table, self.target)
        if self.val_pairs is not None:
            from distalign.synthetic.labels import preference_loglik

            metrics["val_pref_loglik"] = preference_loglik(table, self.val_pairs, scale)
        out = {f"{self.prefix}{k}": v for k, v in metrics.items()}
        self.history.append({"step": float(step), **out})
        return out


def rlhf_floor(logp_ref: Tensor, logp_star: Tensor, gamma: float) -> dict[str, float]:
    """The best forward KL reachable by the RLHF family with the *true* reward γ ln π*.

    RLHF (1) with KL weight β has optimum π_β ∝ π₀ · π*^{γ/β} (closed form, the paper's App. B), so
    min_β E_x KL(π*‖π_β) is a floor no data size removes (the paper's "dilemma"); RKL's
    optimum π₀^{β/(β+γ)} π*^{γ/(β+γ)} instead reaches π* as β → 0. Searched over c = γ/β on a
    fine log grid (plus c = 0, i.e. β = ∞: stay at π₀), with π₀ conditioned on 𝒜.
    """
    ls, lr = logp_star.double(), logp_ref.double()
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-3, 2, 501)])
    best_kl, best_c = float("inf"), 0.0
    for c in grid.tolist():
        lp = torch.log_softmax(lr + c * ls, dim=-1)
        kl = (ls.exp() * (ls - lp)).sum(-1).mean().item()
        if kl < best_kl:
            best_kl, best_c = kl, c
    # beta None: the best is β = ∞ (stay at π₀); the RLHF tilt cannot help at all
    return {"kl_fwd": best_kl, "beta": gamma / best_c if best_c > 0 else None}
