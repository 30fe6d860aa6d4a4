"""Run directories never lose or mix data: a rerun continues its own run only, restarts
cleanly, refuses to retrain a finished run silently, and survives a torn metrics line."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import read_metrics

from distalign.errors import ConfigError
from distalign.train import train
from distalign.train.rundir import config_difference


def _steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir)]


def test_config_difference_ignores_only_horizon_and_logging_keys():
    old = {"method": "dpo", "run": {"max_steps": 2, "batch_size": 4}, "algo": {"beta": 0.1}}
    new = {"method": "pmle", "run": {"max_steps": 9, "batch_size": 8}, "algo": {"gamma": 0.1}}
    diff = config_difference(old, new)
    assert diff[0] == "method: 'dpo' → 'pmle'"
    assert "run.batch_size: 4 → 8" in diff
    assert any(d.startswith("algo.beta") for d in diff) and not any("max_steps" in d for d in diff)
    assert config_difference(old, {**old, "run": {"max_steps": 50, "batch_size": 4}}) == []


def test_a_setting_added_since_an_old_run_counts_as_its_default():
    # a run made before AlgoConfig.update_epochs existed continues (same maths)...
    old = {"method": "dpo", "algo": {"gamma": 0.1}}
    assert config_difference(old, {"method": "dpo", "algo": {"gamma": 0.1,
                                                             "update_epochs": 1}}) == []
    # ...but not if the new value is not the default the old run implied
    assert config_difference(old, {"method": "dpo", "algo": {"gamma": 0.1,
                                                             "update_epochs": 2}}) == [
        "algo.update_epochs: 1 → 2"]


def test_another_config_in_the_same_run_dir_is_refused(make_config, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config("dpo", run_dir, "run.save_every=1"))
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="method: 'dpo' → 'pmle'.*--overwrite"):
        train(make_config("pmle", run_dir, "run.save_every=1"))
    with pytest.raises(ConfigError, match="run.batch_size: 4 → 2"):
        train(make_config("dpo", run_dir, "run.save_every=1", "run.batch_size=2"))
    assert (run_dir / "metrics.jsonl").read_text() == before  # untouched
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"] == "dpo"
    train(make_config("pmle", run_dir, "run.save_every=1", "run.overwrite=true"))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert not any(k.startswith("rewards/") for r in rows for k in r)  # no dpo keys left
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"] == "pmle"


def test_resume_false_removes_the_later_checkpoints_it_replaces(make_config, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config("dpo", run_dir, "run.max_steps=4", "run.save_every=1",
                      "run.keep_checkpoints=10"))
    train(make_config("dpo", run_dir, "run.save_every=1", "run.resume=false",
                      "run.keep_checkpoints=10"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1", "step-2"]
    train(make_config("dpo", run_dir, "run.save_every=1", "run.keep_checkpoints=10"))
    assert _steps(run_dir) == [0, 1, 2]  # not [0, 1, 2, ...] from stale step-4


def test_a_rerun_that_cannot_load_its_model_keeps_the_old_config(make_config, tiny, tmp_path):
    model = shutil.copytree(tiny.policy, tmp_path / "model")
    run_dir = tmp_path / "run"
    over = (f"model.name_or_path={model}", "run.save_every=1")
    train(make_config("dpo", run_dir, *over))
    saved = (run_dir / "config.yaml").read_text()
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ConfigError, match="cannot load policy"):
        train(make_config("dpo", run_dir, *over, "run.max_steps=3"))
    assert (run_dir / "config.yaml").read_text() == saved
    assert _steps(run_dir) == [0, 1, 2]


def test_a_finished_run_without_checkpoints_is_not_retrained_silently(make_config, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config("dpo", run_dir))
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="finished run with no checkpoint.*--overwrite"):
        train(make_config("dpo", run_dir, "run.max_steps=3"))
    assert (run_dir / "metrics.jsonl").read_text() == before
    train(make_config("dpo", run_dir, "run.max_steps=3", "run.overwrite=true"))
    assert _steps(run_dir) == [0, 1, 2, 3]


def test_a_torn_last_metrics_line_is_dropped_on_resume(make_config, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config("dpo", run_dir, "run.save_every=1"))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.6')  # killed mid-write
    train(make_config("dpo", run_dir, "run.save_every=1", "run.max_steps=3"))
    assert _steps(run_dir) == [0, 1, 2, 3]


def test_trainer_state_is_written_atomically(tmp_path, monkeypatch):
    """The state file marks a checkpoint complete: a write cut short (kill -9, full disk)
    must leave the previous whole file, never an empty or partial one."""
    import os

    from distalign.train.checkpoint import TrainState

    path = tmp_path / "trainer_state.json"
    TrainState(step=1).save(path)

    def cut(fd: int) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "fsync", cut)
    with pytest.raises(OSError, match="mid-write"):
        TrainState(step=2).save(path)
    assert TrainState.load(path).step == 1
