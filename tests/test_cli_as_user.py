"""The CLI run the way users run it: a real subprocess with the default progress settings,
output redirected to a file (nohup, slurm, CI logs) and under a pseudo-terminal. The
in-process tests set ``progress=False``; these do not."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import yaml
from conftest import base_config, read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _config(tiny, tmp_path, name: str, steps: int = 3):
    cfg = base_config(tiny, "dpo", tmp_path / name)
    cfg["run"].pop("progress")  # the default (progress on) is what users get
    cfg["run"].update(max_steps=steps, log_every=1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"method": "dpo", **cfg}))
    return path


def _argv(path) -> list[str]:
    return [sys.executable, "-m", "distalign", "train", "dpo", "--config", str(path)]


def test_train_with_output_to_a_file_prints_plain_progress_lines(tiny, tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        proc = subprocess.run(_argv(_config(tiny, tmp_path, "tofile")), stdout=f,
                              stderr=subprocess.STDOUT, env=ENV, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    # the data summary, then one plain line per step (log_every=1) with step, ETA and loss
    assert "rows read" in text and "kept" in text
    for step in (1, 2, 3):
        assert f"dpo {step}/3 elapsed" in text, text
    assert "loss=" in text and "eta" in text
    assert "\x1b[" not in text  # no terminal control codes in a log file
    assert [r["step"] for r in read_metrics(tmp_path / "tofile")] == [0, 1, 2, 3]


def test_train_under_a_pty_draws_the_bar_and_finishes(tiny, tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI with a terminal as stdout/stderr
        os.execve(sys.executable, _argv(_config(tiny, tmp_path, "tty")), ENV)
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "Traceback" not in text and "KeyError" not in text
    assert "3/3" in text  # the rich bar reached the end
    assert (tmp_path / "tty" / "final" / "config.json").exists()
