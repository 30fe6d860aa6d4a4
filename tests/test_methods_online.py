"""Online methods (REBEL, preference distillation, RLHF-PPO, reverse KL) built through the
engine: experience and loss equal the paper's formulas computed here on independent per-row
forward passes, and R̂ lands on the last real response token — for responses that end early
at EOS, end at the length limit with EOS, end immediately, or never end.

A stub sampler returns fixed responses (so every EOS case is present); one PPO case uses the
real HF sampler.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import last_one, row_head_outputs, row_scores, row_token_logps
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from distalign.lm.generation import Rollout
from distalign.methods import base
from distalign.train import Trainer

TOL = dict(atol=1e-5, rtol=1e-5)
PAD, EOS, WIDTH, TEMP = 0, 1, 6, 0.7
RESPONSES = [  # cycled over the N = B·k rows (sample-major)
    [23, 1],  # EOS early: pads follow
    [4, 92, 23, 5, 72, 96],  # hits the length limit without EOS
    [35, 24, 72, 30, 51, 1],  # EOS exactly at the last column
    [1],  # EOS first: an empty response
    [57, 23, 4, 93, 1],
    [60, 61, 62, 63, 64, 65],  # never ends
]


class FixedSampler:
    """A sampler that answers any prompts with ``RESPONSES`` in the Rollout layout."""

    def generate(self, model, prompt_input_ids, prompt_attention_mask, num_samples=1):
        ids = prompt_input_ids.repeat(num_samples, 1)
        attn = prompt_attention_mask.repeat(num_samples, 1)
        n = ids.shape[0]
        resp = torch.full((n, WIDTH), PAD)
        mask = torch.zeros((n, WIDTH), dtype=torch.long)
        for i in range(n):
            r = RESPONSES[i % len(RESPONSES)]
            resp[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ended = torch.tensor([RESPONSES[i % len(RESPONSES)][-1] == EOS for i in range(n)])
        return Rollout(
            input_ids=torch.cat([ids, resp], 1),
            attention_mask=torch.cat([attn, mask], 1),
            response_mask=torch.cat([torch.zeros_like(attn), mask], 1),
            prompt_length=ids.shape[1],
            ended=ended,
            response_lengths=mask.sum(-1),
            num_samples=num_samples,
        )


def _setup(make_config, tmp_path, tiny, method, *over, stub=True):
    cfg = make_config(method, tmp_path / method, f"model.ref_model={tiny.ref}",
                      f"gen.temperature={TEMP}", *over)
    trainer = Trainer(cfg)
    if stub:
        trainer.method.ctx.sampler = FixedSampler()
    batch = next(iter(trainer.loader))
    models = {
        "policy": trainer.acc.unwrap_model(trainer.trainables[0]),
        "ref": AutoModelForCausalLM.from_pretrained(tiny.ref),
        "rm": AutoModelForSequenceClassification.from_pretrained(tiny.reward),
    }
    return trainer, batch, models


def _close(got, want):
    torch.testing.assert_close(torch.as_tensor(got).float(), torch.as_tensor(want).float(), **TOL)


def _flat(exp, key):  # [B, 2, ...] pairs → [2B, ...] (first samples, then second samples)
    return torch.cat([exp[key][:, 0], exp[key][:, 1]], 0)


def _pair_terms(exp, models, beta):
    """Independent ln π_θ (at T), ln π₀ (at T), R̂ and r = R̂ − β(ln π_t − ln π₀) per row."""
    ids, attn, resp = (_flat(exp, k) for k in ("input_ids", "attention_mask", "response_mask"))
    seq = lambda m, t: (row_token_logps(m, ids, attn, t) * resp).sum(-1)  # noqa: E731
    lp, ref = seq(models["policy"], TEMP), seq(models["ref"], TEMP)
    score = row_scores(models["rm"], ids, attn, resp)
    return lp, ref, score, score - beta * (lp - ref), seq(models["policy"], 1.0)


@pytest.mark.parametrize("form", ["pi_0", "pi_t"])
def test_rebel_loss_is_the_squared_regression_error(make_config, tmp_path, tiny, form):
    eta, beta = 2.0, 0.1
    trainer, batch, models = _setup(
        make_config, tmp_path, tiny, "rebel", f"algo.eta={eta}", f"algo.beta={beta}",
        f"algo.form={form}",
    )
    exp, _ = trainer.method.collect(batch)
    loss, _ = trainer.method.loss(exp)
    lp, ref, score, r, _ = _pair_terms(exp, models, beta)
    b = lp.shape[0] // 2
    _close(_flat(exp, "score"), score)
    _close(_flat(exp, "reward"), r)
    assert _flat(exp, "ended").tolist() == [float(x[-1] == EOS) for x in
                                            (RESPONSES[i % 6] for i in range(2 * b))]
    base = lp if form == "pi_t" else ref  # π_t = π_θ at collection time
    pred = (lp[:b] - base[:b]) - (lp[b:] - base[b:])
    want = ((pred - eta * (r[:b] - r[b:])) ** 2).mean()
    if form == "pi_0":
        assert pred.abs().min() > 1e-3  # π₀ ≠ π, so the regression term is not trivial
    _close(loss, want)


def test_distill_loss_is_bernoulli_kl_to_the_reward_preference(make_config, tmp_path, tiny):
    gamma, beta = 0.5, 0.1
    trainer, batch, models = _setup(
        make_config, tmp_path, tiny, "distill", f"algo.gamma={gamma}", f"algo.beta={beta}"
    )
    exp, _ = trainer.method.collect(batch)
    loss, metrics = trainer.method.loss(exp)
    _, _, _, r, lp1 = _pair_terms(exp, models, beta)
    b = r.shape[0] // 2
    p = torch.sigmoid(r[:b] - r[b:])  # p̃ = σ(r(a1) − r(a2)), the simulator's preference
    z = gamma * (lp1[:b] - lp1[b:])  # P_π = σ(z) at temperature 1 (eq. 3)
    q = torch.sigmoid(z)
    # KL(Bern(p) ‖ Bern(q)), with ln q = ln σ(z), ln(1 − q) = ln σ(−z) (stable for large |z|)
    want = (p * (p.log() - F.logsigmoid(z)) + (1 - p) * ((1 - p).log() - F.logsigmoid(-z)))
    want = want.mean()
    _close(exp["target"], p)
    _close(loss, want)
    _close(metrics["distill/model_prob"], q.mean())


# ------------------------------------------------------------------------------ PPO
def _ppo_reference(exp, models, value_model, beta, ent, lam, vf_coef, whiten):
    """Shaped rewards, values, GAE, whitening and the PPO loss at ratio 1, written out."""
    p = int(exp["prompt_length"][0])
    ids, attn, resp = exp["input_ids"], exp["attention_mask"], exp["response_mask"]
    m = resp[:, p:].float()
    lp = row_token_logps(models["policy"], ids, attn, TEMP)[:, p:]
    ref = row_token_logps(models["ref"], ids, attn, TEMP)[:, p:]
    score = row_scores(models["rm"], ids, attn, resp)
    rewards = (-beta * (lp - ref) - ent * lp) * m
    rewards[torch.arange(len(m)), last_one(m)] += score
    values = row_head_outputs(value_model, ids, attn)[:, p - 1 : -1] * m  # V(s_t): head at t−1
    adv, nxt = torch.zeros_like(m), torch.zeros(len(m))
    for t in reversed(range(m.shape[1])):
        v_next = values[:, t + 1] * m[:, t + 1] if t + 1 < m.shape[1] else torch.zeros(len(m))
        alive = m[:, t + 1] if t + 1 < m.shape[1] else torch.zeros(len(m))
        delta = rewards[:, t] + v_next - values[:, t]  # discount 1
        nxt = (delta + lam * nxt * alive) * m[:, t]
        adv[:, t] = nxt
    returns = (adv + values) * m
    if whiten:
        mean = (adv * m).sum() / m.sum()
        var = ((adv - mean) ** 2 * m).sum() / m.sum()
        adv = (adv - mean) / torch.sqrt(var + 1e-8) * m
    policy_loss = -(adv * m).sum() / m.sum()  # ratio 1: the clip is inactive
    value_loss = 0.5 * ((values - returns) ** 2 * m).sum() / m.sum()  # V = V_old: no clip
    return rewards, adv, returns, policy_loss + vf_coef * value_loss


@pytest.mark.parametrize(
    "method,whiten,stub",
    [("rlhf", False, True), ("rkl", True, True), ("rlhf", True, False), ("rkl", False, False)],
)
def test_ppo_loss_is_clipped_objective_at_ratio_one_plus_value_term(
    make_config, tmp_path, tiny, method, whiten, stub
):
    beta, ent, lam, vf = 0.1, (0.2 if method == "rkl" else 0.0), 0.9, 0.5
    over = [f"algo.beta={beta}", f"algo.gae_lambda={lam}", f"algo.vf_coef={vf}",
            f"algo.whiten_advantages={str(whiten).lower()}"]
    if method == "rkl":
        over.append(f"algo.gamma={ent}")
    trainer, batch, models = _setup(make_config, tmp_path, tiny, method, *over, stub=stub)
    torch.manual_seed(0)
    exp, _ = trainer.method.collect(batch)
    loss, metrics = trainer.method.loss(exp)
    value_model = trainer.acc.unwrap_model(trainer.trainables[1])
    _, adv, returns, want = _ppo_reference(exp, models, value_model, beta, ent, lam, vf, whiten)
    _close(exp["advantages"], adv)
    _close(exp["returns"], returns)
    _close(loss, want)
    _close(metrics["ppo/ratio"], 1.0)


@pytest.mark.parametrize("method,penalty", [("rlhf", None), ("rlhf", 2.0), ("rkl", None)])
def test_reward_lands_on_the_last_real_response_token(
    make_config, tmp_path, tiny, method, penalty
):
    """With discount = λ = 1 the returns are reward-to-go, so r_t = G_t − G_{t+1} recovers the
    shaped rewards from ``collect``: R̂ on the last response token (the EOS, or the last
    generated token when there is none), −β·KL_t (− γ ln π) on every response token, and
    exactly 0 after EOS."""
    beta, ent = 0.1, (0.2 if method == "rkl" else 0.0)
    over = [f"algo.beta={beta}", "algo.gae_lambda=1.0", "algo.discount=1.0",
            "algo.whiten_advantages=false"]
    if method == "rkl":
        over.append(f"algo.gamma={ent}")
    if penalty is not None:
        over.append(f"algo.missing_eos_penalty={penalty}")
    trainer, batch, models = _setup(make_config, tmp_path, tiny, method, *over)
    exp, _ = trainer.method.collect(batch)
    p = int(exp["prompt_length"][0])
    g = exp["returns"]
    m = exp["response_mask"][:, p:].float()
    rewards = g - F.pad(g[:, 1:] * m[:, 1:], (0, 1))

    ids, attn, resp = exp["input_ids"], exp["attention_mask"], exp["response_mask"]
    lp = row_token_logps(models["policy"], ids, attn, TEMP)[:, p:]
    ref = row_token_logps(models["ref"], ids, attn, TEMP)[:, p:]
    score = row_scores(models["rm"], ids, attn, resp)  # head on the row cut at its last token
    per_token = (-beta * (lp - ref) - ent * lp) * m
    assert per_token.abs().sum() > 0
    for i in range(len(m)):
        r = RESPONSES[i % len(RESPONSES)]
        last = len(r) - 1  # EOS index, or the last generated column without EOS
        ended = r[-1] == EOS
        final = score[i] if ended or penalty is None else torch.tensor(-penalty)
        want = per_token[i].clone()
        want[last] += final
        _close(rewards[i], want)
        assert (rewards[i, last + 1 :] == 0).all()  # nothing after EOS (pads)
        if not ended:
            assert last == WIDTH - 1


@pytest.mark.parametrize("method", ["rebel", "rlhf"])
def test_sampler_logprobs_stand_in_for_the_policy_forward(make_config, tmp_path, tiny, method,
                                                          monkeypatch):
    """``gen.record_logprobs``: collection takes ln π_t from the HF sampler's own logits and
    runs no forward of π_t for it; the values equal an independent per-row forward at T."""
    trainer, batch, models = _setup(make_config, tmp_path, tiny, method,
                                    "gen.record_logprobs=true", stub=False)

    def no_forward(*args, **kwargs):
        raise AssertionError("collection ran a forward of π_t")

    trainer.method.policy_token_logprobs = no_forward  # type: ignore[method-assign]
    policy, packed = trainer.method.ctx.policy, base.pair_sequence_logprobs

    def pairs_but_not_policy(model, *args, **kwargs):  # π₀ (another model) may run
        return no_forward() if model is policy else packed(model, *args, **kwargs)

    monkeypatch.setattr(base, "pair_sequence_logprobs", pairs_but_not_policy)
    torch.manual_seed(0)
    exp, _ = trainer.method.collect(batch)
    if method == "rebel":
        lp, _, _, _, _ = _pair_terms(exp, models, 0.0)
        _close(_flat(exp, "old_logp"), lp)
    else:
        p = int(exp["prompt_length"][0])
        mask = exp["response_mask"][:, p:]
        want = row_token_logps(models["policy"], exp["input_ids"], exp["attention_mask"], TEMP)
        _close(exp["old_logp"] * mask, want[:, p:] * mask)
        assert mask.sum() > 0
