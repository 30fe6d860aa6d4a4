"""Checkpoint/resume: a run that stops and continues logs exactly what an uninterrupted run logs.

Each test trains an uninterrupted reference run, and a run that stops after step k (either a
crash right after the checkpoint, or a finished shorter run that is then extended with a
larger ``run.max_steps``), then resumes it in the same run directory. The metrics of steps
k+1… must be identical: same weights, optimizer and scheduler (``lr``), same data position
(the batches seen, also across an epoch boundary) and same RNG (sampled responses).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_metrics, rows_by_step

from distalign.train import train

# 12 rows / batch 4 = 3 steps per epoch: resuming at step 4 restarts mid-epoch 1, and the
# resumed run crosses into epoch 2, so the data position and per-epoch order both matter.
CRASH = "simulated crash"


class Recorder:
    """Wraps a method class's ``collect`` to record the batches seen; can crash at a call."""

    def __init__(self, monkeypatch, method_cls) -> None:
        self.seen: list[tuple] = []
        self.crash_at: int | None = None
        real = method_cls.collect

        def collect(method, batch):
            key = "prompt_input_ids" if "prompt_input_ids" in batch else "input_ids"
            self.seen.append(tuple(map(tuple, batch[key].tolist())))
            if self.crash_at is not None and len(self.seen) == self.crash_at:
                raise RuntimeError(CRASH)
            return real(method, batch)

        monkeypatch.setattr(method_cls, "collect", collect)

    def take(self) -> list[tuple]:
        out, self.seen = self.seen, []
        return out


def _same_rows(a: dict, b: dict, steps: range, keys: tuple[str, ...]) -> None:
    for s in steps:
        for k in keys:
            assert a[s][k] == b[s][k], f"step {s} {k}: {a[s][k]} != {b[s][k]}"


def _interrupted_vs_uninterrupted(make_config, tmp_path, monkeypatch, method, method_cls,
                                  over, k, total, keys):
    rec = Recorder(monkeypatch, method_cls)
    common = (*over, f"run.max_steps={total}", f"run.save_every={k}")
    ref_dir = train(make_config(method, tmp_path / "ref", *common))
    ref_batches = rec.take()
    assert len(ref_batches) == total

    rec.crash_at = k + 1  # dies inside step k+1, after the checkpoint of step k
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match=CRASH):
        train(make_config(method, run_dir, *common))
    assert rec.take() == ref_batches[: k + 1]
    assert (run_dir / "checkpoints" / f"step-{k}" / "trainer_state.json").exists()

    rec.crash_at = None
    train(make_config(method, run_dir, *common))
    assert rec.take() == ref_batches[k:]  # data position restored, epochs included
    ref, got = rows_by_step(ref_dir), rows_by_step(run_dir)
    assert sorted(got) == list(range(total + 1))  # one row per step, none duplicated
    _same_rows(ref, got, range(1, total + 1), keys)
    state = json.loads((run_dir / "checkpoints" / f"step-{k}" / "trainer_state.json").read_text())
    assert state["step"] == k
    return ref, got


def test_dpo_resume_after_crash_is_exact(make_config, tmp_path, monkeypatch):
    from distalign.methods.dpo import DPO

    over = ("optim.scheduler=linear", "optim.warmup_steps=2")
    keys = ("loss", "lr", "rewards/chosen", "rewards/rejected", "grad_norm", "epoch")
    ref, _ = _interrupted_vs_uninterrupted(
        make_config, tmp_path, monkeypatch, "dpo", DPO, over, k=4, total=7, keys=keys
    )
    lrs = [ref[s]["lr"] for s in range(1, 8)]
    # warmup then linear decay over 7 optimizer steps: lr of update i (0-based) is
    # 1e-3 · i/2 for i < 2, else 1e-3 · (7 − i)/5
    want = [1e-3 * (i / 2 if i < 2 else (7 - i) / 5) for i in range(7)]
    assert lrs == pytest.approx(want)


def test_rlhf_resume_after_crash_restores_rng_and_both_models(
    make_config, tmp_path, monkeypatch
):
    from distalign.methods.rlhf import RLHF

    over = ("algo.update_epochs=2", "run.mini_batch_size=2", "optim.scheduler=cosine")
    keys = ("loss", "lr", "env/score", "env/kl", "loss/value", "ppo/approx_kl")
    _interrupted_vs_uninterrupted(
        make_config, tmp_path, monkeypatch, "rlhf", RLHF, over, k=2, total=4, keys=keys
    )


def test_extending_a_finished_online_run_continues_it(make_config, tmp_path, monkeypatch):
    """``max_steps=k`` (with ``save_every=k``), then the same run dir with ``max_steps=k+3``:
    the extension continues from step k instead of starting over. With a constant schedule
    the result equals an uninterrupted k+3 run, sampled responses included."""
    from distalign.methods.rebel import REBEL

    rec = Recorder(monkeypatch, REBEL)
    over = ("optim.scheduler=constant", "algo.update_epochs=2", "run.save_every=2")
    ref_dir = train(make_config("rebel", tmp_path / "ref", *over, "run.max_steps=5"))
    ref_batches = rec.take()
    run_dir = tmp_path / "run"
    train(make_config("rebel", run_dir, *over, "run.max_steps=2"))
    assert (run_dir / "checkpoints" / "step-2").is_dir()  # the last step is checkpointed
    train(make_config("rebel", run_dir, *over, "run.max_steps=5"))
    assert rec.take() == ref_batches  # 2 steps, then the 3 that follow them
    ref, got = rows_by_step(ref_dir), rows_by_step(run_dir)
    assert sorted(got) == list(range(6))
    keys = ("loss", "lr", "env/score", "env/reward", "env/kl", "rebel/abs_error")
    _same_rows(ref, got, range(1, 6), keys)
    samples = [json.loads(ln) for ln in (run_dir / "samples.jsonl").read_text().splitlines()]
    ref_samples = [json.loads(ln) for ln in (ref_dir / "samples.jsonl").read_text().splitlines()]
    assert samples == ref_samples
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 5


def test_extending_with_a_decaying_schedule_follows_the_new_horizon(make_config, tmp_path):
    """Extending a linear schedule: the resumed steps use the lr of the new horizon (the
    same lr an uninterrupted run of that length uses at those steps), never a stale 0."""
    over = ("optim.scheduler=linear", "run.save_every=2")
    ref = rows_by_step(train(make_config("dpo", tmp_path / "ref", *over, "run.max_steps=5")))
    run_dir = tmp_path / "run"
    first = rows_by_step(train(make_config("dpo", run_dir, *over, "run.max_steps=2")))
    assert [first[s]["lr"] for s in (1, 2)] == pytest.approx([1e-3, 5e-4])
    got = rows_by_step(train(make_config("dpo", run_dir, *over, "run.max_steps=5")))
    assert [got[s]["lr"] for s in (3, 4, 5)] == pytest.approx([ref[s]["lr"] for s in (3, 4, 5)])
    assert all(got[s]["lr"] > 0 for s in (3, 4, 5))
    # it continued from the shorter run's weights (its step 2 used lr 5e-4, not 8e-4), so
    # its later losses are not the uninterrupted run's, as they would be after a restart
    assert got[3]["loss"] != ref[3]["loss"]
    assert [got[s]["loss"] for s in (1, 2)] == [first[s]["loss"] for s in (1, 2)]


def test_resume_false_starts_over(make_config, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config("dpo", run_dir, "run.max_steps=2", "run.save_every=1"))
    first = read_metrics(run_dir)
    train(make_config("dpo", run_dir, "run.max_steps=3", "run.resume=false"))
    again = read_metrics(run_dir)
    assert [r["step"] for r in again] == [0, 1, 2, 3]
    assert again[1]["loss"] == first[1]["loss"]  # step 1 recomputed from the initial model


def test_eval_does_not_perturb_training_randomness(make_config, tmp_path, tiny):
    """Evaluation samples too (online methods); it must not shift the training RNG stream,
    or a run's trajectory would depend on eval_every (and resume could not be exact)."""
    base = ("run.max_steps=3", "algo.update_epochs=1")
    plain = rows_by_step(train(make_config("rebel", tmp_path / "plain", *base)))
    evald = rows_by_step(
        train(make_config("rebel", tmp_path / "eval", *base, f"data.eval_path={tiny.pairs}",
                          "run.eval_every=1"))
    )
    assert "eval/env/score" in evald[1]
    _same_rows(plain, evald, range(1, 4), ("loss", "env/score", "env/reward"))
    torch.testing.assert_close(torch.tensor(evald[1]["loss"]), torch.tensor(plain[1]["loss"]))


def test_no_step0_eval_skips_only_the_baseline_row(make_config, tmp_path, tiny):
    """``run.eval_at_start=false``: no step-0 evaluation, the same training trajectory and
    the same final evaluation as a run that evaluated π at step 0."""
    base = ("run.max_steps=2", "algo.update_epochs=1", f"data.eval_path={tiny.pairs}")
    with_start = rows_by_step(train(make_config("rebel", tmp_path / "a", *base)))
    without = rows_by_step(train(make_config("rebel", tmp_path / "b", *base,
                                             "run.eval_at_start=false")))
    assert "eval/env/score" in with_start[0]
    assert not any(k.startswith("eval/") for k in without[0])
    _same_rows(with_start, without, range(1, 3), ("loss", "env/score"))
    _same_rows(with_start, without, range(2, 3), ("eval/env/score",))  # the final evaluation


@pytest.mark.parametrize("method", ["dpo", "rlhf"])
def test_lora_checkpoints_hold_trainable_weights_and_resume_exactly(
    method, make_config, tmp_path, monkeypatch
):
    """A LoRA run's checkpoints leave the frozen base model out (the model files hold the
    trainable weights only), and resuming from them is still exact."""
    from safetensors import safe_open

    from distalign.methods.dpo import DPO
    from distalign.methods.rlhf import RLHF

    lora = ("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8")
    if method == "dpo":
        cls, keys, k, total = DPO, ("loss", "lr", "rewards/chosen", "grad_norm"), 2, 4
    else:
        cls, keys, k, total = RLHF, ("loss", "lr", "env/score", "loss/value"), 2, 3
    _interrupted_vs_uninterrupted(make_config, tmp_path, monkeypatch, method, cls, lora, k=k,
                                  total=total, keys=keys)
    ckpt = tmp_path / "run" / "checkpoints" / f"step-{k}"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names), names[:5]
