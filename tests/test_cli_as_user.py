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


def test_third_party_tqdm_bars_are_off_when_output_goes_to_a_file(tmp_path):
    # transformers' GGUF loader draws a tqdm bar past its own progress-bar switch
    code = ("from distalign import cli\ntry:\n    cli.main(['toy', '--help'])\n"
            "except SystemExit:\n    pass\nfrom tqdm import tqdm\n"
            "import sys\nprint('tqdm disabled:', tqdm(range(2), file=sys.stderr).disable)")
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=f,
                             env={k: v for k, v in ENV.items() if k != "TQDM_DISABLE"},
                             text=True, timeout=120)
    assert out.returncode == 0, log.read_text()
    assert out.stdout.strip().endswith("tqdm disabled: True"), out.stdout
