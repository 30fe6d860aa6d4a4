"""Exact metrics of the synthetic world against brute force on a hand-sized world
(2 prompts × 6 responses), including the mass a policy leaks outside 𝒜."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.synthetic.labels import sample_pairs
from distalign.synthetic.lm import world_policy, world_tokenizer
from distalign.synthetic.metrics import (
    ExactEvaluator,
    ExactMetricsCallback,
    exact_metrics,
    reward_metrics,
    rlhf_floor,
)
from distalign.synthetic.world import WorldConfig, build_world

HAND = WorldConfig(prompt_len=1, num_content=2, max_len=2, gamma=0.7, seed=3)
SMALL = dict(n_embd=16, n_inner=32, n_head=2, initializer_range=0.6)


@pytest.fixture(scope="module")
def setup():
    world = build_world(HAND)
    tok = world_tokenizer(world)
    policy = world_policy(tok, seed=1, **SMALL)
    ref = world_policy(tok, seed=2, **SMALL)
    return world, tok, policy, ref


@torch.no_grad()
def next_logprobs(model, ids: list[int]) -> list[float]:
    """ln p(· | ids) from one unpadded forward (independent of the batched path)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return torch.log_softmax(logits, -1).tolist()


def brute_policy(model, world, tok):
    """ln π(a|x) for every enumerated a, and the exact mass of the two kinds of junk."""
    eos = tok.eos_token_id
    table, junk = [], []
    for x in world.prompts:
        p_ids = tok(x, add_special_tokens=False)["input_ids"]
        row = []
        for resp in world.responses:
            ids, total = list(p_ids), 0.0
            for t in [*tok(resp, add_special_tokens=False)["input_ids"], eos]:
                total += next_logprobs(model, ids)[t]
                ids.append(t)
            row.append(total)
        table.append(row)
        # junk: EOS first (empty response), or a content token where EOS is mandatory
        empty = math.exp(next_logprobs(model, p_ids)[eos])
        overlong = 0.0
        for j, r in enumerate(world.responses):
            if len(r.split()) == world.config.max_len:
                stop = math.exp(next_logprobs(model, p_ids + tok(r)["input_ids"])[eos])
                # P(prefix r) = π(r + EOS) / P(EOS | r); it continues with probability 1 − stop
                overlong += math.exp(table[-1][j]) / stop * (1 - stop)
        junk.append(empty + overlong)
    return torch.tensor(table, dtype=torch.float64), torch.tensor(junk, dtype=torch.float64)


def brute_metrics(lq, ls, lr, gamma):
    P, N = ls.shape
    keys = ("kl_fwd", "kl_fwd_cond", "kl_rev", "entropy", "kl_ref", "win_ref", "win_star")
    out = dict.fromkeys(keys, 0.0)
    for x in range(P):
        q = [math.exp(v) for v in lq[x].tolist()]
        r = [math.exp(v) for v in lr[x].tolist()]
        s = [math.exp(v) for v in ls[x].tolist()]
        mq, mr = sum(q), sum(r)
        qb, rb = [v / mq for v in q], [v / mr for v in r]
        out["kl_fwd"] += sum(s[a] * math.log(s[a] / q[a]) for a in range(N)) / P
        out["kl_fwd_cond"] += sum(s[a] * math.log(s[a] / qb[a]) for a in range(N)) / P
        out["kl_rev"] += sum(qb[a] * math.log(qb[a] / s[a]) for a in range(N)) / P
        out["entropy"] -= sum(qb[a] * math.log(qb[a]) for a in range(N)) / P
        out["kl_ref"] += sum(qb[a] * math.log(qb[a] / rb[a]) for a in range(N)) / P
        for key, opp, m_opp in (("win_ref", r, mr), ("win_star", s, 1.0)):
            win = sum(
                q[a] * opp[b] / (1 + math.exp(-gamma * math.log(s[a] / s[b])))
                for a in range(N) for b in range(N)
            )
            # valid beats invalid, invalid vs invalid is a tie
            win += mq * (1 - m_opp) + 0.5 * (1 - mq) * (1 - m_opp)
            out[key] += win / P
    return out


def test_batched_policy_logprobs_and_leak_match_brute_force(setup):
    world, tok, policy, _ = setup
    ev = ExactEvaluator(world, tok, chunk_size=5)  # several chunks, padded rows
    lq = ev.policy_logprobs(policy)
    brute, junk = brute_policy(policy, world, tok)
    torch.testing.assert_close(lq, brute, atol=1e-5, rtol=0)
    # every generated string is valid, empty, or overlong: the three masses sum to one
    ones = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(lq.exp().sum(-1) + junk, ones, atol=1e-5, rtol=0)
    assert exact_metrics(lq, world.logp_star(), world.gamma)["leak"] == pytest.approx(
        junk.mean().item(), abs=1e-6
    )
    assert junk.min() > 0.01  # the random policy really leaks, so the check has teeth


def test_exact_metrics_match_brute_force(setup):
    world, tok, policy, ref = setup
    ev = ExactEvaluator(world, tok)
    lq, lr, ls = ev.policy_logprobs(policy), ev.policy_logprobs(ref), world.logp_star()
    got = exact_metrics(lq, ls, world.gamma, lr)
    want = brute_metrics(lq, ls, lr, world.gamma)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got["kl_fwd"] > 0 and got["kl_rev"] > 0


def test_metrics_of_the_target_itself():
    world = build_world(HAND)
    ls = world.logp_star()
    m = exact_metrics(ls, ls, world.gamma, ls)
    assert m["kl_fwd"] == pytest.approx(0, abs=1e-12) and m["kl_rev"] == pytest.approx(0, abs=1e-12)
    assert m["leak"] == pytest.approx(0, abs=1e-12)
    assert m["win_star"] == pytest.approx(0.5) and m["win_ref"] == pytest.approx(0.5)
    # leaking half the mass uniformly costs exactly ln 2 of forward KL and wins a quarter less
    half = exact_metrics(ls - math.log(2), ls, world.gamma)
    assert half["kl_fwd"] == pytest.approx(math.log(2)) and half["leak"] == pytest.approx(0.5)
    assert half["kl_rev"] == pytest.approx(0, abs=1e-12)  # π̂ conditioned on 𝒜 is π*
    assert half["kl_fwd_cond"] == pytest.approx(0, abs=1e-12)
    assert half["win_star"] == pytest.approx(0.25)


def test_reward_metrics_of_the_true_reward():
    world = build_world(HAND)
    ls = world.logp_star()
    shift = torch.tensor([[3.0], [-1.0]])  # BT cannot see a per-prompt offset
    exact = reward_metrics(world.gamma * ls + shift, ls, world.gamma)
    assert exact["rm_kl_fwd"] == pytest.approx(0, abs=1e-12)
    assert exact["rm_corr"] == pytest.approx(1)
    assert reward_metrics(torch.zeros_like(ls), ls, world.gamma)["rm_kl_fwd"] > 0.05


def test_rlhf_floor_closed_forms():
    world = build_world(HAND)
    ls = world.logp_star()
    # π₀ ∝ π*^0.5: RLHF reaches π* at γ/β = 0.5, i.e. β = 2γ — no floor
    tempered = torch.log_softmax(0.5 * ls, -1)
    floor = rlhf_floor(tempered, ls, world.gamma)
    assert floor["kl_fwd"] < 1e-4 and floor["beta"] == pytest.approx(2 * world.gamma, rel=0.02)
    # a generic π₀ (the SFT distribution) leaves a floor strictly between 0 and KL(π*‖π₀)
    lsft = world.logp_sft()
    kl0 = exact_metrics(lsft, ls, world.gamma)["kl_fwd"]
    assert 0.001 < rlhf_floor(lsft, ls, world.gamma)["kl_fwd"] < kl0


def test_callback_scores_policies_and_reward_models(setup):
    world, tok, policy, ref = setup
    ev = ExactEvaluator(world, tok, logp_ref=ExactEvaluator(world, tok).policy_logprobs(ref))
    val = sample_pairs(world, world.logp_star(), 64, seed=0)
    cb = ExactMetricsCallback(ev, val)
    out = cb.on_evaluate(0, policy, tok)
    assert {"synthetic/kl_fwd", "synthetic/win_ref", "synthetic/val_pref_loglik"} <= set(out)
    assert out["synthetic/val_pref_loglik"] < 0
    from transformers import LlamaConfig, LlamaForSequenceClassification

    rm = LlamaForSequenceClassification(
        LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    ).eval()
    scores = cb.on_evaluate(1, rm, tok)
    assert set(scores) == {"synthetic/rm_kl_fwd", "synthetic/rm_corr", "synthetic/val_pref_loglik"}
    assert len(cb.history) == 2


@pytest.mark.parametrize("method,beta", [("rlhf", 0.5), ("rebel", 2.0), ("rkl", 0.0),
                                         ("rkl", 0.3), ("distill", 0.1)])
def test_objective_gap_is_the_objective_suboptimality_over_its_temperature(method, beta):
    from distalign.synthetic.metrics import fixed_point, objective_gap

    gen = torch.Generator().manual_seed(7)
    P, N, gamma = 4, 6, 0.7
    reward = torch.randn(P, N, generator=gen, dtype=torch.float64)
    ref = torch.log_softmax(torch.randn(P, N, generator=gen, dtype=torch.float64), -1)
    pol = torch.log_softmax(torch.randn(P, N, generator=gen, dtype=torch.float64), -1)
    # each method's objective, exactly: E_π[R̂] − β KL(π‖π₀) (+ γ H(π) for RKL and distill)
    entropy_weight = gamma if method in ("rkl", "distill") else 0.0

    def objective(lp):
        p = lp.exp()
        return ((p * reward).sum(-1) - beta * (p * (lp - ref)).sum(-1)
                - entropy_weight * (p * lp).sum(-1)).mean().item()

    target = fixed_point(method, {"beta": beta}, reward, ref, gamma)
    assert objective_gap(target, target) == pytest.approx(0.0, abs=1e-12)
    temperature = beta + entropy_weight
    gap = objective_gap(pol, target)
    assert objective(target) - objective(pol) == pytest.approx(temperature * gap, rel=1e-9)
    assert objective(target) > objective(pol)  # π_T maximises the objective


def test_log_mass_is_the_leaks_share_of_the_forward_kl():
    from distalign.synthetic.metrics import exact_metrics

    gen = torch.Generator().manual_seed(3)
    star = torch.log_softmax(torch.randn(5, 8, generator=gen, dtype=torch.float64), -1)
    hat = torch.log_softmax(torch.randn(5, 8, generator=gen, dtype=torch.float64), -1)
    mass = torch.tensor([0.9, 0.95, 1.0, 0.7, 0.99], dtype=torch.float64)
    m = exact_metrics(hat + mass.log()[:, None], star, 1.0)  # sub-normalised: leaks 1 − mass
    assert m["log_mass"] == pytest.approx(mass.log().mean().item(), rel=1e-12)
    assert m["kl_fwd"] == pytest.approx(m["kl_fwd_cond"] - m["log_mass"], rel=1e-12)
    assert m["leak"] == pytest.approx(1 - mass.mean().item(), rel=1e-12)
