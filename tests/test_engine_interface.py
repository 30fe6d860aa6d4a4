"""The engine/method contract: collect returns (experience, metrics) and runs with dropout
off; the engine logs training samples (never eval ones) and times each phase."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROMPTS, read_metrics
from torch import nn

from distalign.lm.logprobs import token_logprobs
from distalign.lm.wrappers import eval_mode
from distalign.train import Trainer, train
from distalign.train.tracking import progress_info


def test_eval_mode_restores_every_submodule():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 2))
    model.train()
    model[2].eval()  # a frozen part inside a training model keeps its own mode
    with eval_mode(model, None):
        assert not any(m.training for m in model.modules())
    assert model.training and model[1].training and not model[2].training


def test_online_run_logs_phase_times_that_add_up(make_config, tmp_path):
    run_dir = train(make_config("rebel", tmp_path / "r", "algo.update_epochs=1"))
    for row in read_metrics(run_dir)[1:]:
        phases = [row[f"time/{p}"] for p in ("generate", "score", "update", "other")]
        assert row["time/generate"] > 0 and row["time/score"] > 0 and row["time/update"] > 0
        assert row["time/other"] >= 0
        assert sum(phases) == pytest.approx(row["step_time"], rel=1e-9, abs=1e-9)
        assert "time gen=" in progress_info(row) and "upd=" in progress_info(row)


def test_samples_are_training_samples_even_when_eval_samples_too(make_config, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": "my cat is big", "chosen": "yes",
                                     "rejected": "no"}) + "\n")
    run_dir = train(make_config("rebel", tmp_path / "r", "algo.update_epochs=1",
                                f"data.eval_path={eval_file}", "run.eval_every=1"))
    rows = [json.loads(ln) for ln in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["prompt"] in PROMPTS for r in rows), rows
    assert "eval/env/score" in read_metrics(run_dir)[1]


@pytest.fixture(scope="module")
def dropout_policy(tiny, tmp_path_factory):
    """The tiny policy with attention dropout 0.5 (eager attention applies it in train mode)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("dropout")
    model = AutoModelForCausalLM.from_pretrained(tiny.policy, attention_dropout=0.5)
    model.save_pretrained(out)
    for f in tiny.policy.glob("*token*"):
        shutil.copy(f, out / f.name)
    return out


def _ppo_trainer(make_config, tmp_path, policy, *extra):
    return Trainer(make_config(
        "rlhf", tmp_path / "r", f"model.name_or_path={policy}", "algo.update_epochs=1",
        "model.attn_implementation=eager", *extra))


def _first_batch(trainer):
    return {k: v.to(trainer.acc.device) for k, v in next(iter(trainer.loader)).items()}


def test_first_ppo_epoch_ratio_is_exactly_one_with_a_dropout_model(
        make_config, tmp_path, dropout_policy, monkeypatch):
    import distalign.methods.rlhf as rlhf

    seen: list[dict] = []
    real = rlhf.ppo_policy_loss

    def spy(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        seen.append({k: float(v) for k, v in metrics.items()})
        return loss, metrics

    monkeypatch.setattr(rlhf, "ppo_policy_loss", spy)
    trainer = _ppo_trainer(make_config, tmp_path, dropout_policy)
    policy = trainer.acc.unwrap_model(trainer.trainables[0])
    assert policy.model.layers[0].self_attn.attention_dropout == 0.0  # disabled at load
    trainer.fit()
    assert seen[0]["ppo/ratio"] == 1.0 and seen[0]["ppo/approx_kl"] == 0.0


def test_old_logprobs_are_computed_without_dropout(make_config, tmp_path, dropout_policy):
    trainer = _ppo_trainer(make_config, tmp_path, dropout_policy, "model.disable_dropout=false")
    policy = trainer.trainables[0]
    assert policy.training
    with eval_mode(policy):  # as the engine runs it
        exp, metrics = trainer.method.collect(_first_batch(trainer))
    assert "env/score" in metrics and policy.training  # mode restored
    p = int(exp["prompt_length"][0])
    with torch.no_grad(), eval_mode(policy):
        clean = token_logprobs(policy, exp["input_ids"], exp["attention_mask"], 0.7)[:, p:]
    torch.testing.assert_close(exp["old_logp"], clean, rtol=0, atol=0)
    with torch.no_grad():  # train mode: dropout changes them, so the check above can fail
        noisy = token_logprobs(policy, exp["input_ids"], exp["attention_mask"], 0.7)[:, p:]
    assert (noisy - clean).abs().max() > 1e-3


def test_eval_metrics_are_means_over_rows_whatever_the_batching(make_config, tmp_path):
    """5 held-out pairs in batches of 2, 2, 1 give the metrics of one batch of 5 (a mean of
    batch means would weigh the last pair double)."""
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"prompt": p, "chosen": "yes it is", "rejected": "no"})
                                 + "\n" for p in PROMPTS[:5]))
    first = []
    for bs in (2, 5):
        run_dir = train(make_config("reward", tmp_path / f"b{bs}", f"data.eval_path={eval_file}",
                                    f"run.batch_size={bs}", "run.max_steps=1",
                                    "run.eval_at_start=true"))
        first.append(read_metrics(run_dir)[0])
    keys = [k for k in first[1] if k.startswith("eval/")]
    assert "eval/rm/accuracy" in keys and "eval/loss/bt" in keys
    for k in keys:
        assert first[0][k] == pytest.approx(first[1][k], rel=1e-5, abs=1e-6), k
    acc = first[0]["eval/rm/accuracy"] * 5
    assert acc == pytest.approx(round(acc), abs=1e-5)  # a fraction of the 5 pairs
