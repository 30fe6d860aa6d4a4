"""What a new user hit, replayed through the real CLI in subprocesses: Ctrl-C and SIGTERM exit
130/143 with one line and a checkpoint, two processes never share a run directory or a
generations file, a retrained run never reuses its old generations or evaluation, and two
judges in turn keep both results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import base_config, read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distalign", *args], capture_output=True,
                          text=True, env=ENV, timeout=300, **kw)


def _start(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distalign", *args], env=ENV,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _config(tiny, tmp_path: Path, name: str, **run) -> Path:
    cfg = base_config(tiny, "dpo", tmp_path / "runs" / name)
    cfg["run"].update(progress=False, **run)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"method": "dpo", **cfg}))
    return path


def _wait_for(pred, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _steps_logged(run: Path) -> int:
    try:
        return len(read_metrics(run))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_training_checkpoints_the_step_and_exits_non_zero(tiny, tmp_path, sig,
                                                                          code):
    run = tmp_path / "runs" / "long"
    cfg = _config(tiny, tmp_path, "long", max_steps=100_000, save_every=100_000, log_every=1)
    proc = _start("train", "dpo", "--config", str(cfg), log=tmp_path / "log.txt")
    _wait_for(lambda: _steps_logged(run) > 3, "training steps")
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    text = (tmp_path / "log.txt").read_text()
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert "interrupted at step" in last and "rerun the same command to resume" in last, text
    step = int(last.split("interrupted at step ")[1].split("/")[0])
    # the checkpoint is the interrupted step itself, and a rerun continues from it
    assert (run / "checkpoints" / f"step-{step}").is_dir()
    again = _cli("train", "dpo", "--config", str(cfg), f"run.max_steps={step + 2}")
    assert again.returncode == 0, again.stderr
    assert f"resumed from {run / 'checkpoints' / f'step-{step}'}" in again.stderr
    assert [r["step"] for r in read_metrics(run)][-3:] == [step, step + 1, step + 2]


def test_a_second_process_on_the_same_run_directory_is_refused_with_the_holders_pid(tiny,
                                                                                    tmp_path):
    run = tmp_path / "runs" / "shared"
    cfg = _config(tiny, tmp_path, "shared", max_steps=100_000, save_every=0, log_every=1)
    first = _start("train", "dpo", "--config", str(cfg), log=tmp_path / "first.txt")
    try:
        _wait_for(lambda: _steps_logged(run) > 1, "the first run's steps")
        second = _cli("train", "dpo", "--config", str(cfg))
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"error: run directory {run} is in use by another distalign process (pid "
            f"{first.pid}); wait for it to finish, or choose another name"]
        steps = [r["step"] for r in read_metrics(run)]
        assert steps == sorted(set(steps))  # one run's rows, never interleaved
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    # the OS dropped the lock with its holder, even after kill -9
    third = _start("train", "dpo", "--config", str(cfg), "run.overwrite=true",
                   log=tmp_path / "third.txt")
    _wait_for(lambda: _steps_logged(run) > 1, "the third run's steps")
    third.kill()
    third.wait(timeout=60)
    fourth = _cli("train", "dpo", "--config", str(cfg), "run.max_steps=2", "run.overwrite=true")
    assert fourth.returncode == 0, fourth.stderr


def test_a_retrained_run_never_reuses_its_generations_or_evaluation(tiny, tmp_path):
    run = tmp_path / "runs" / "dpo-tiny"
    cfg = _config(tiny, tmp_path, "dpo-tiny", max_steps=2, save_every=1)
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": "yes"}) + "\n"
                               for p in ("the dog is", "how was your day")))
    inside, outside = run / "generations.jsonl", tmp_path / "gens" / "dpo.jsonl"
    gen = ["gen.max_new_tokens=4", "--prompts", str(prompts), "--no-progress"]
    assert _cli("train", "dpo", "--config", str(cfg)).returncode == 0
    for out in (inside, outside):
        assert _cli("generate", str(run), *gen, "--out", str(out)).returncode == 0
    ev = _cli("eval", str(inside), "--judge", f"reward:{tiny.reward}", "--no-progress")
    assert ev.returncode == 0, ev.stderr
    old = json.loads((run / "eval" / "eval.json").read_text())["weights"]
    assert old.startswith("sha256:")

    # extended by two steps: new weights under the same path
    assert _cli("train", "dpo", "--config", str(cfg), "run.max_steps=4").returncode == 0
    again = _cli("generate", str(run), *gen, "--out", str(outside))
    assert again.returncode == 2
    assert "was generated with other weights" in again.stderr and "trained again" in again.stderr
    rep = _cli("report", str(run), "--metrics", "loss")
    assert rep.returncode == 0, rep.stderr
    assert "evaluated by older weights" in rep.stdout and "win-rate" not in rep.stdout

    # --overwrite clears everything derived from the run
    assert _cli("train", "dpo", "--config", str(cfg), "--overwrite").returncode == 0
    for gone in (inside, inside.with_name("generations.meta.json"), run / "eval"):
        assert not gone.exists(), gone


def test_two_judges_in_turn_keep_both_results_and_the_first_keeps_its_columns(tiny, tmp_path):
    from distalign.testing import save_tiny, tiny_reward_model, tiny_tokenizer

    other = tmp_path / "rm2"
    tok = tiny_tokenizer()
    save_tiny(tok, other)
    save_tiny(tiny_reward_model(tok, seed=7), other)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": "yes it is"}) + "\n"
                               for p in ("the dog is", "how was your day", "you are good")))
    gens = tmp_path / "base" / "generations.jsonl"
    assert _cli("generate", str(tiny.policy), "--prompts", str(prompts), "--out", str(gens),
                "gen.max_new_tokens=4", "--no-progress").returncode == 0
    first = _cli("eval", str(gens), "--judge", f"reward:{tiny.reward}",
                 "--reward-model", str(tiny.reward), "--no-progress")
    assert first.returncode == 0, first.stderr
    one = json.loads((gens.parent / "eval" / "eval.json").read_text())["metrics"]
    second = _cli("eval", str(gens), "--judge", f"reward:{other}", "--no-progress")
    assert second.returncode == 0, second.stderr
    both = json.loads((gens.parent / "eval" / "eval.json").read_text())
    m = both["metrics"]
    for key in ("eval/win_rate", "eval/rm_score"):  # the first judge's and the RM's stay
        assert m[key] == one[key]
    assert both["judge"] == f"reward:{tiny.reward}"
    assert "eval/win_rate@reward:rm2" in m and both["judges"]["reward:rm2"]["judged"] == 3
    assert (gens.parent / "eval" / "annotations@reward_rm2.json").is_file()
    rep = _cli("report", str(gens.parent))
    assert rep.returncode == 0, rep.stderr
    assert "[reward:reward]" in rep.stdout and "[reward:rm2]" in rep.stdout, rep.stdout


def test_an_output_directory_that_cannot_be_written_is_one_line(tiny, tmp_path):
    blocker = tmp_path / "file.txt"  # a file where a directory should be (root ignores modes)
    blocker.write_text("x")
    cfg = _config(tiny, tmp_path, "ro", max_steps=2)
    train = _cli("train", "dpo", "--config", str(cfg), f"run.output_dir={blocker}")
    gen = _cli("generate", str(tiny.policy), "--prompts", str(tiny.pairs),
               "--out", str(blocker / "g.jsonl"), "--no-progress")
    for proc in (train, gen):
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "cannot write there" in proc.stderr


def test_ctrl_c_during_generate_exits_130_and_the_rerun_completes_the_file(tiny, tmp_path):
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the dog is {i}"}) + "\n"
                               for i in range(400)))
    out = tmp_path / "g.jsonl"
    args = ("generate", str(tiny.policy), "--prompts", str(prompts), "--out", str(out),
            "--batch-size", "1", "gen.max_new_tokens=8", "--no-progress")
    proc = _start(*args, log=tmp_path / "log.txt")
    _wait_for(lambda: out.is_file() and out.stat().st_size > 0, "the first rows")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    text = (tmp_path / "log.txt").read_text()
    assert "Traceback" not in text and text.strip().splitlines()[-1] == "interrupted by SIGINT"
    assert _cli(*args).returncode == 0
    assert len(out.read_text().splitlines()) == 400
