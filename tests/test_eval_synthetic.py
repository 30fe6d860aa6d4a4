"""Estimator checks in the synthetic world, where the truth is known exactly.

Two tiny GPT-2 policies are fitted in a few seconds by exact maximum likelihood on the
enumerated world (π on π*, π₀ on π_sft), so that almost all their mass is on the response
space 𝒜. Samples of π are evaluated against samples of π₀ (the "reference" replies):

- the ``oracle`` judge's win-rate must match the exact oracle win-rate of π against π₀
  (``exact_metrics``' ``win_ref``, eq. (3)) within its 95 % bootstrap CI;
- the KL estimate must match the exact KL(π‖π₀) of ``distalign.synthetic.metrics`` within
  two standard errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distalign.eval.evaluate import evaluate, sidecar_path
from distalign.lm.generation import GenerationConfig, make_sampler
from distalign.lm.logprobs import token_logprobs
from distalign.synthetic import build_world, exact_metrics, world_policy, world_tokenizer
from distalign.synthetic.lm import save_policy
from distalign.synthetic.metrics import ExactEvaluator
from distalign.testing import left_pad

SAMPLES = 300  # per prompt: 9 × 300 = 2700 pairs


def _fit(ev: ExactEvaluator, target: torch.Tensor, seed: int, steps: int = 90):
    """Full-batch maximum likelihood of the enumerated distribution ``target`` ([P, N])."""
    tok = ev.tokenizer
    model = world_policy(tok, seed=seed).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    weights = target.exp().reshape(-1).float() / target.shape[0]
    for _ in range(steps):
        lp = (token_logprobs(model, ev.input_ids, ev.attention_mask) * ev.response_mask).sum(-1)
        loss = -(weights * lp).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_eval")
    world = build_world()
    tok = world_tokenizer(world)
    ev = ExactEvaluator(world, tok)
    pi, pi0 = _fit(ev, world.logp_star(), 0), _fit(ev, world.logp_sft(), 1)
    exact = exact_metrics(ev.policy_logprobs(pi), world.logp_star(), world.gamma,
                          ev.policy_logprobs(pi0))
    assert exact["leak"] < 0.01  # nearly all mass on 𝒜, where the exact metrics live
    save_policy(pi, tok, root / "pi")
    save_policy(pi0, tok, root / "pi0")
    world.save(root / "world.json")
    cfg = GenerationConfig(max_new_tokens=world.config.max_len + 1, temperature=1.0)
    sampler = make_sampler(cfg, tok)
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in world.prompts]
    ids, attn = left_pad(p_ids, tok.pad_token_id)
    torch.manual_seed(0)
    ours, refs = sampler.generate(pi, ids, attn, SAMPLES), sampler.generate(pi0, ids, attn, SAMPLES)

    def response(ro, n: int) -> list[int]:
        return ro.responses[n][ro.response_mask[n, ro.prompt_length:] == 1].tolist()

    rows = []
    for n in range(ours.input_ids.shape[0]):
        j, b = divmod(n, world.num_prompts)
        out = response(ours, n)
        rows.append({"prompt_id": str(b), "prompt": world.prompts[b],
                     "output": tok.decode(out, skip_special_tokens=True),
                     "reference": tok.decode(response(refs, n), skip_special_tokens=True),
                     "generator": "pi", "sample": j, "num_tokens": len(out),
                     "ended": bool(ours.ended[n]), "prompt_token_ids": p_ids[b],
                     "output_token_ids": out})
    gens = root / "gens.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sidecar_path(gens).write_text(json.dumps({
        "model": str(root / "pi"), "model_path": str(root / "pi"), "chat_template": False,
        "gen": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 0}}))
    result = evaluate(gens, root / "eval", judge=f"oracle:{root / 'world.json'}",
                      ref_model=str(root / "pi0"), batch_size=512, progress=False)
    return result, exact


def test_oracle_win_rate_matches_exact_within_ci(world_run):
    result, exact = world_run
    m = result["metrics"]
    lo, hi = result["win_rate_ci95"]
    assert m["eval/n"] == 9 * SAMPLES
    assert lo <= 100 * exact["win_ref"] <= hi, (m["eval/win_rate"], 100 * exact["win_ref"])
    assert hi - lo < 6  # the interval is tight enough for the check to mean something
    assert result["judge"].startswith("oracle:")


def test_kl_estimate_matches_exact_within_se(world_run):
    result, exact = world_run
    m = result["metrics"]
    se = m["eval/kl_ref_se"]
    assert se < 0.25 * exact["kl_ref"]  # tight enough that a wrong estimator would fail
    assert abs(m["eval/kl_ref"] - exact["kl_ref"]) <= 2 * se, (m["eval/kl_ref"], exact["kl_ref"])
    assert abs(m["eval/kl_ref_k3"] - exact["kl_ref"]) <= 2 * m["eval/kl_ref_k3_se"]


def test_oracle_rules_outside_the_response_space(tmp_path):
    from distalign.synthetic.oracle import OracleJudge

    judge = OracleJudge()
    w = judge.world
    ls = w.logp_star()
    a, b = w.responses[0], w.responses[5]
    expect = torch.sigmoid(w.gamma * (ls[0, 0] - ls[0, 5])).item()
    assert judge.prob(w.prompts[0], a, b) == pytest.approx(expect)
    assert judge.prob(w.prompts[0], a, "") == 1.0  # valid beats invalid (π* = 0)
    assert judge.prob(w.prompts[0], "a a a a", "") == 0.5  # two invalid strings tie
    with pytest.raises(Exception, match="not a prompt of this synthetic world"):
        judge.prob("z z", a, b)
    assert Path(w.save(tmp_path / "world.json")).is_file()
