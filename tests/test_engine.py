"""The engine end to end: every method trains through ``load_config`` + ``train`` and leaves a
run directory that plain transformers can use; gradient accumulation; the NaN guard."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import read_metrics
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from distalign.errors import TrainingError
from distalign.methods import METHODS
from distalign.train import Trainer, train

# One loss-ish metric every method logs, to check the numbers are real and finite.
LOSS_KEY = {
    "sft": "loss/nll", "reward": "loss/bt", "dpo": "loss/pref", "pmle": "loss/pref",
    "rebel": "loss/rebel", "distill": "loss/distill", "rlhf": "loss/policy", "rkl": "loss/policy",
}
ONLINE_UPDATE = ("algo.update_epochs=1",)  # keep online methods to one pass per step (speed)


def _check_run_dir(run_dir, method: str, steps: int) -> None:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(steps + 1))  # step 0 = initial evaluation
    for r in rows[1:]:
        assert math.isfinite(r["loss"]) and math.isfinite(r[LOSS_KEY[method]])
        assert r["lr"] > 0 and r["step_time"] > 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"] == method and saved["run"]["max_steps"] == steps
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == method and summary["step"] == steps
    assert summary["metrics"]["loss"] == pytest.approx(rows[-1]["loss"])


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_writes_a_plain_hf_model(method, make_config, tmp_path, tiny):
    extra = ONLINE_UPDATE if method in ("rebel", "distill", "rlhf", "rkl") else ()
    trainer = Trainer(make_config(method, tmp_path / method, "run.max_steps=2", *extra))
    run_dir = trainer.fit()
    assert run_dir == tmp_path / method
    _check_run_dir(run_dir, method, 2)
    final = run_dir / "final"
    auto = AutoModelForSequenceClassification if method == "reward" else AutoModelForCausalLM
    tok = AutoTokenizer.from_pretrained(final)
    batch = tok(["the cat is good", "where is the moon you are good"], return_tensors="pt",
                padding=True)
    # final/, reloaded by plain transformers, is the engine's trained model to float precision
    saved, trained = auto.from_pretrained(final), trainer.acc.unwrap_model(trainer.trainables[0])
    out = _logits(saved, batch)
    torch.testing.assert_close(out, _logits(trained, batch), rtol=0, atol=1e-6)
    if method != "reward":  # and not π₀: two steps moved it (reward's head starts fresh)
        start = _logits(AutoModelForCausalLM.from_pretrained(tiny.policy), batch)
        assert (out - start).abs().max() > 1e-4
    if method in ("rlhf", "rkl"):  # PPO's value model is saved next to the policy
        value = AutoModelForSequenceClassification.from_pretrained(final / "value_model")
        torch.testing.assert_close(
            _logits(value, batch), _logits(trainer.acc.unwrap_model(trainer.trainables[1]), batch),
            rtol=0, atol=1e-6)
    # sampled, so samples logged (PMLE samples for its KL term only when β > 0)
    if method in ("rebel", "distill", "rlhf", "rkl") or (
            method == "pmle" and trainer.cfg.algo.beta > 0):
        assert (run_dir / "samples.jsonl").read_text().strip()


def test_training_changes_the_weights(make_config, tmp_path, tiny):
    """``final/`` holds the *trained* weights, not the initial ones."""
    run_dir = train(make_config("sft", tmp_path / "sft", "run.max_steps=2"))
    before = AutoModelForCausalLM.from_pretrained(tiny.policy).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_lora_run_writes_merged_model_and_adapter(method, make_config, tmp_path, tiny):
    over = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]
    run_dir = train(make_config(method, tmp_path / method, *over))
    _check_run_dir(run_dir, method, 2)
    final = run_dir / "final"
    assert (final / "adapter" / "adapter_config.json").exists()
    assert not (final / "adapter_config.json").exists()  # final/ itself is a plain model
    auto = AutoModelForSequenceClassification if method == "reward" else AutoModelForCausalLM
    merged = auto.from_pretrained(final)
    assert not any("lora" in k for k in merged.state_dict())
    # the merged weights equal base + adapter, i.e. peft's own view of the trained model
    from peft import PeftModel

    base = auto.from_pretrained(tiny.policy, **({"num_labels": 1} if method == "reward" else {}))
    peft_model = PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    want = peft_model(input_ids=ids).logits
    got = merged.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    if method == "dpo":  # training moved the adapter: the merged model is not the base
        fresh = AutoModelForCausalLM.from_pretrained(tiny.policy)
        assert not torch.allclose(got, fresh(input_ids=ids).logits)


# ------------------------------------------------------------------- gradient accumulation
def _first_update(make_config, run_dir, method: str, accum: int) -> dict[str, torch.Tensor]:
    """The gradients of the first optimizer step (of every trained model), and its loss."""
    extra = ("algo.update_epochs=1",) if method in ("rlhf", "rebel") else ()
    cfg = make_config(
        method, run_dir, f"run.grad_accum={accum}", "run.max_steps=1", "optim.max_grad_norm=0",
        *extra,
    )
    trainer = Trainer(cfg)
    grads: dict[str, torch.Tensor] = {}
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):  # snapshot the accumulated gradients the update will use
        for i, model in enumerate(trainer.trainables):
            for name, p in model.named_parameters():
                grads[f"{i}.{name}"] = p.grad.detach().clone()
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    batch = next(iter(trainer.loader))
    metrics = trainer._update(trainer.method.collect(batch)[0], 0)
    grads["__loss__"] = torch.tensor(metrics["loss"])
    return grads


@pytest.mark.parametrize("method", ["dpo", "sft", "rlhf", "rebel"])
def test_grad_accum_gives_the_same_update(method, make_config, tmp_path):
    """Micro-batches weighted by their share (pairs for DPO/REBEL, tokens for SFT and PPO)
    reproduce the full-batch mean: the gradient of the first update with grad_accum=2 (and 4)
    equals grad_accum=1. (Online methods sample the same responses: every Trainer starts
    from the same seed.) Gradients, not Adam's first step ≈ lr·sign(g), which amplifies
    rounding noise in near-zero entries."""
    ref = _first_update(make_config, tmp_path / "a1", method, 1)
    assert ref["__loss__"] != 0
    for accum in (2, 4):
        got = _first_update(make_config, tmp_path / f"a{accum}", method, accum)
        assert got.keys() == ref.keys()
        for k in ref:
            scale = float(ref[k].abs().max())
            torch.testing.assert_close(got[k], ref[k], atol=1e-5 * scale + 1e-12, rtol=1e-4,
                                       msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------- NaN guard
def test_non_finite_loss_stops_with_one_line_error_and_saved_state(
    make_config, tmp_path, monkeypatch
):
    from distalign.methods.dpo import DPO

    real_loss = DPO.loss
    calls = {"n": 0}

    def poisoned(self, exp):
        calls["n"] += 1
        loss, metrics = real_loss(self, exp)
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    monkeypatch.setattr(DPO, "loss", poisoned)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingError) as info:
        train(make_config("dpo", run_dir, "run.max_steps=3"))
    msg = str(info.value)
    assert "\n" not in msg and "non-finite loss at step 2" in msg
    saved = run_dir / "checkpoints" / "nan-step-1"
    assert str(saved) in msg
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == 1
    assert any(saved.glob("model*.safetensors"))
    # the failed step was not applied and nothing after it ran
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1]
    assert not (run_dir / "final").exists()


def test_huge_lr_hits_the_nan_guard(make_config, tmp_path):
    run_dir = tmp_path / "boom"
    cfg = make_config(
        "sft", run_dir, "optim.lr=1e30", "optim.max_grad_norm=0", "run.max_steps=6"
    )
    with pytest.raises(TrainingError, match="non-finite loss") as info:
        train(cfg)
    assert "\n" not in str(info.value)
    assert list((run_dir / "checkpoints").glob("nan-step-*"))
