"""Each offline method's loss, built through the engine (``Trainer(cfg)`` → ``collect`` →
``loss``), equals the paper's formula written out here on independent per-row forward passes.

π₀ is a *different* checkpoint than π (``model.ref_model``), so no term vanishes trivially.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import row_scores, row_token_logps
from transformers import AutoModelForCausalLM

from distalign.train import Trainer

TOL = dict(atol=1e-5, rtol=1e-5)


def _setup(make_config, tmp_path, method, *over):
    trainer = Trainer(make_config(method, tmp_path / method, *over))
    batch = next(iter(trainer.loader))
    return trainer, batch


def _policy(trainer):
    return trainer.acc.unwrap_model(trainer.trainables[0])


def _seq(model, batch, temperature=1.0):
    """Σ over response tokens of ln π, per row of a sequence batch."""
    tok = row_token_logps(model, batch["input_ids"], batch["attention_mask"], temperature)
    return (tok * batch["response_mask"]).sum(-1)


def _close(got, want):
    torch.testing.assert_close(torch.as_tensor(got).float(), torch.as_tensor(want).float(), **TOL)


def test_sft_loss_is_token_mean_nll(make_config, tmp_path):
    trainer, batch = _setup(make_config, tmp_path, "sft")
    loss, metrics = trainer.method.loss(trainer.method.collect(batch)[0])
    tok = row_token_logps(_policy(trainer), batch["input_ids"], batch["attention_mask"])
    mask = batch["response_mask"].float()
    want = -(tok * mask).sum() / mask.sum()  # mean over completion tokens, not per row
    _close(loss, want)
    assert loss.requires_grad and metrics["sft/tokens"] == mask.sum()


@pytest.mark.parametrize("center", [0.0, 0.3])
def test_reward_loss_is_bradley_terry_nll(make_config, tmp_path, center):
    trainer, batch = _setup(make_config, tmp_path, "reward", f"algo.center_coef={center}")
    loss, metrics = trainer.method.loss(trainer.method.collect(batch)[0])
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    r = row_scores(_policy(trainer), ids, attn, resp)  # score at the last response token
    b = ids.shape[0] // 2
    want = -F.logsigmoid(r[:b] - r[b:]).mean() + center * ((r[:b] + r[b:]) ** 2).mean()
    _close(loss, want)
    _close(metrics["rm/accuracy"], (r[:b] > r[b:]).float().mean())


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_loss_matches_eq6(make_config, tmp_path, tiny, precompute):
    gamma = 0.5
    trainer, batch = _setup(
        make_config, tmp_path, "dpo", f"algo.gamma={gamma}", f"model.ref_model={tiny.ref}",
        f"algo.precompute_ref={str(precompute).lower()}",
    )
    exp, _ = trainer.method.collect(batch)
    loss, metrics = trainer.method.loss(exp)
    ref = AutoModelForCausalLM.from_pretrained(tiny.ref)
    pol, ref_lp = _seq(_policy(trainer), batch), _seq(ref, batch)
    b = pol.shape[0] // 2
    delta, delta_ref = pol[:b] - pol[b:], ref_lp[:b] - ref_lp[b:]
    assert (delta - delta_ref).abs().min() > 1e-3  # π₀ ≠ π: the reference term matters
    _close(loss, -F.logsigmoid(gamma * (delta - delta_ref)).mean())
    _close(metrics["rewards/chosen"], (gamma * (pol[:b] - ref_lp[:b])).mean())


def test_pmle_without_kl_has_no_reference(make_config, tmp_path):
    gamma = 0.5
    trainer, batch = _setup(make_config, tmp_path, "pmle", f"algo.gamma={gamma}", "algo.beta=0")
    assert trainer.models.ref is None and trainer.ctx.sampler is None
    loss, _ = trainer.method.loss(trainer.method.collect(batch)[0])
    pol = _seq(_policy(trainer), batch)
    b = pol.shape[0] // 2
    _close(loss, -F.logsigmoid(gamma * (pol[:b] - pol[b:])).mean())


@pytest.mark.parametrize("baseline", [True, False])
def test_pmle_loss_matches_eq5_with_online_kl_surrogate(make_config, tmp_path, tiny, baseline):
    gamma, beta, k = 0.5, 0.1, 2
    trainer, batch = _setup(
        make_config, tmp_path, "pmle", f"algo.gamma={gamma}", f"algo.beta={beta}",
        f"algo.kl_samples={k}", f"model.ref_model={tiny.ref}",
        f"algo.kl_baseline={str(baseline).lower()}",
    )
    torch.manual_seed(0)
    exp, _ = trainer.method.collect(batch)
    loss, metrics = trainer.method.loss(exp)
    policy, ref = _policy(trainer), AutoModelForCausalLM.from_pretrained(tiny.ref)
    pol = _seq(policy, batch)
    b = pol.shape[0] // 2
    pref = -F.logsigmoid(gamma * (pol[:b] - pol[b:])).mean()
    # the k fresh samples per prompt, sampled at temperature 1 (the KL is of π itself)
    samples = {key: exp[f"kl_{key}"].flatten(0, 1) for key in
               ("input_ids", "attention_mask", "response_mask")}
    assert samples["input_ids"].shape[0] == b * k
    seq_pol, seq_ref = _seq(policy, samples), _seq(ref, samples)
    s = seq_pol - seq_ref
    adv = s - (s.sum() - s) / (len(s) - 1) if baseline else s  # leave-one-out baseline
    # REINFORCE surrogate β·mean(stopgrad(s − b)·ln π(a)): its gradient is ∇ β·KL(π‖π₀)
    _close(loss, pref + beta * (adv * seq_pol).mean())
    _close(metrics["kl/online"], s.mean())
