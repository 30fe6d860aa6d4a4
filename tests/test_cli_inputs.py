"""What a new user types, through the real CLI in subprocesses: path typos answered in one line
with the closest local names and without hub retries, NAME:SPLIT and data.subset, TRL's
UltraFeedback rows, report_to as one name, run directories as models, threads, and the
single-dash long option.

Wall times are printed (``pytest -s``) and bounded by ``5 s + 2 × startup``, where startup is
``distalign train dpo --print-config`` measured here (start, imports, config): on a shared
host at load 12 on 2 cores that alone took 20 s, while the old hub retries took 30–55 s on top
of it. The one-line stderr assertion catches the retries themselves, whatever the load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import base_config, read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("HF_HUB_OFFLINE", None)


def _cli(*args: str, cwd: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess,
                                                                   float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "distalign", *args], capture_output=True,
                          text=True, env=env or ENV, timeout=600, cwd=cwd)
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def startup(tmp_path_factory) -> float:
    """Seconds to start and parse a config (imports the training stack), at today's load."""
    proc, seconds = _cli("train", "dpo", "--print-config", cwd=tmp_path_factory.mktemp("v"))
    assert proc.returncode == 0, proc.stderr
    return seconds


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def home(tiny, tmp_path) -> Path:
    """A working directory as a user has one: tiny/ (the policy), runs/rm (a finished reward
    run), pref.jsonl, prompts.jsonl and dpo.yaml; an empty HF cache."""
    shutil.copytree(tiny.policy, tmp_path / "tiny")
    shutil.copytree(tiny.reward, tmp_path / "runs" / "rm" / "final")
    shutil.copytree(tiny.ref, tmp_path / "runs" / "sft" / "final")
    for run in ("rm", "sft"):
        (tmp_path / "runs" / run / "config.yaml").write_text("method: sft\n")
        (tmp_path / "runs" / run / "metrics.jsonl").write_text("")
    shutil.copy(tiny.pairs, tmp_path / "pref.jsonl")
    shutil.copy(tiny.pairs, tmp_path / "prompts.jsonl")
    cfg = base_config(tiny, "dpo", tmp_path / "runs" / "dpo")
    cfg["model"]["name_or_path"] = "tiny"
    cfg["data"]["path"] = "pref.jsonl"
    cfg["run"].update(progress=False, max_steps=1, output_dir="runs")
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(cfg))  # no `method:`, so any method
    return tmp_path


TYPOS = {
    "data file": (["train", "dpo", "--config", "dpo.yaml", "data.path=pref.jsonll"], {},
                  "data file not found: pref.jsonll (did you mean pref.jsonl"),
    "model dir": (["train", "dpo", "--config", "dpo.yaml", "model.name_or_path=./tiy"], {},
                  "cannot load model.name_or_path from './tiy': no such directory (did you "
                  "mean tiny?)"),
    "run dir": (["train", "rebel", "--config", "dpo.yaml", "model.reward_model=runs/rmm"], {},
                "model.reward_model from 'runs/rmm': no such directory (did you mean runs/rm?)"),
    "hub name": (["train", "dpo", "--config", "dpo.yaml", "model.name_or_path=tinyy"], {},
                 "model.name_or_path 'tinyy' is not a local path (did you mean tiny?) and not in "
                 "the HF cache"),
    "hub name offline": (["train", "dpo", "--config", "dpo.yaml", "model.name_or_path=tinyy"],
                         {"HF_HUB_OFFLINE": "1"}, "(HF_HUB_OFFLINE is set)"),
    "hub dataset": (["train", "dpo", "--config", "dpo.yaml", "data.path=org/no-such-data"], {},
                    "dataset 'org/no-such-data' is not a local path and not in the HF cache"),
    "prompts file": (["generate", "tiny", "--prompts", "prompts.jsonll"], {},
                     "prompts file not found: prompts.jsonll (did you mean prompts.jsonl"),
    "generate model": (["generate", "tinyy", "--prompts", "prompts.jsonl"], {},
                       "is not a local path (did you mean tiny?) and not in the HF cache"),
    "single dash": (["train", "dpo", "-config", "dpo.yaml"], {},
                    "-config has one dash, so it reads as short options; did you mean --config?"),
}


@pytest.mark.parametrize("case", list(TYPOS))
def test_a_typo_is_one_line_at_once(case, home, startup):
    args, extra, needle = TYPOS[case]
    env = {**ENV, "HF_HOME": str(home / "hf-empty"), **extra}  # nothing cached
    proc, seconds = _cli(*args, cwd=home, env=env)
    line = _one_error_line(proc)
    assert needle in line, line
    assert "Retrying" not in proc.stderr and "thrown while requesting" not in proc.stderr
    print(f"\n{case}: {seconds:.1f} s (startup {startup:.1f} s, load {os.getloadavg()[0]:.1f})")
    assert seconds < 5 + 2 * startup


def _data_read(run: Path) -> tuple[str, int]:
    train = json.loads((run / "summary.json").read_text())["data"]["train"]
    return train["source"], train["rows_read"]


def test_name_colon_split_and_subset_in_train_and_generate(home):
    rows = [json.loads(x) for x in (home / "pref.jsonl").read_text().splitlines()]
    for sub, part in (("plain", rows), ("en", rows[:8]), ("fr", rows[8:])):
        (home / "ds" / sub).mkdir(parents=True)
        for split, chunk in (("train", part), ("test", part[:3])):
            (home / "ds" / sub / f"{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in chunk))
    (home / "ds" / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
        f"  - split: test\n    path: {s}/test.jsonl\n" for s in ("en", "fr")) + "---\n")
    proc, _ = _cli("train", "dpo", "--config", "dpo.yaml", "data.path=ds/plain:test",
                   "run.batch_size=2", cwd=home)
    assert proc.returncode == 0, proc.stderr
    assert _data_read(home / "runs" / "dpo") == ("ds/plain[test]", 3)
    proc, _ = _cli("train", "dpo", "--config", "dpo.yaml", "data.path=ds:train",
                   "data.subset=fr", "run.batch_size=2", "run.name=fr", cwd=home)
    assert proc.returncode == 0, proc.stderr
    assert _data_read(home / "runs" / "fr") == ("ds[train]", 4)
    proc, _ = _cli("generate", "tiny", "--prompts", "ds/plain:test", "--out", "g.jsonl",
                   "--threads", "1", "gen.max_new_tokens=2", cwd=home)
    assert proc.returncode == 0, proc.stderr
    assert len((home / "g.jsonl").read_text().splitlines()) == 3


def test_ultrafeedback_rows_train_exactly_like_their_plain_form(home):
    rows = [json.loads(x) for x in (home / "pref.jsonl").read_text().splitlines()]
    forms = {
        "uf": [{"prompt": r["prompt"],
                **{k: [{"role": "user", "content": r["prompt"]},
                       {"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")}}
               for r in rows],
        "plain": [{"prompt": [{"role": "user", "content": r["prompt"]}],
                   **{k: [{"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")}}
                  for r in rows],
    }
    forms["bad"] = json.loads(json.dumps(forms["uf"]))
    forms["bad"][1]["chosen"][0]["content"] = "the cat is"
    losses = {}
    for name, data in forms.items():
        (home / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        proc, _ = _cli("train", "dpo", "--config", "dpo.yaml", f"data.path={name}.jsonl",
                       f"run.name={name}", "run.max_steps=2", cwd=home)
        if name == "bad":
            line = _one_error_line(proc)
            assert "bad.jsonl row 2 (line 2): field 'chosen' is a conversation but does not " \
                   "start with the text of 'prompt'" in line, line
            continue
        assert proc.returncode == 0, proc.stderr
        losses[name] = [r["loss"] for r in read_metrics(home / "runs" / name)
                        if "loss" in r]
    assert len(losses["uf"]) == 2 and losses["uf"] == losses["plain"]


def test_report_to_as_one_name(home):
    cfg = yaml.safe_load((home / "dpo.yaml").read_text())
    cfg["run"]["report_to"] = "tensorboard"
    (home / "tb.yaml").write_text(yaml.safe_dump(cfg))
    for args in (["--config", "tb.yaml"], ["--config", "dpo.yaml", "run.report_to=tensorboard"]):
        proc, _ = _cli("train", "dpo", *args, "--print-config", cwd=home)
        assert proc.returncode == 0, proc.stderr
        assert yaml.safe_load(proc.stdout)["run"]["report_to"] == ["tensorboard"]


def test_run_directories_as_every_model_and_threads(home):
    proc, _ = _cli("train", "rlhf", "--config", "dpo.yaml", "model.name_or_path=runs/sft",
                   "model.ref_model=runs/sft", "model.reward_model=runs/rm",
                   "model.value_model=runs/rm", "run.name=ppo", "run.batch_size=2",
                   "run.threads=1", cwd=home)
    assert proc.returncode == 0, proc.stderr
    assert "torch CPU threads: 1 (run.threads)" in proc.stdout
    model = yaml.safe_load((home / "runs" / "ppo" / "config.yaml").read_text())["model"]
    assert model["name_or_path"] == model["ref_model"] == str(Path("runs/sft/final"))
    assert model["reward_model"] == model["value_model"] == str(Path("runs/rm/final"))
    proc, _ = _cli("train", "dpo", "--config", "dpo.yaml", "run.threads=0", cwd=home)
    assert "run.threads must be >= 1" in _one_error_line(proc)


def test_default_threads(monkeypatch):
    from distalign.lm import threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads()[0] == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.default_threads()[0] == 2  # 4 idle cores for 2 processes
    monkeypatch.setattr(os, "getloadavg", lambda: (3.4, 0.0, 0.0))
    assert threads.default_threads()[0] == 1  # other work keeps 3 of the 4 busy
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 0.0, 0.0))
    assert threads.default_threads() == (2, "4 cores, 1 process(es), load 1.6")


def test_name_colon_split_and_subset_rules(tmp_path):
    from distalign.errors import ConfigError
    from distalign.lm.data import DataConfig, load_rows

    c = DataConfig(path="org/data:test", eval_path="org/other:validation")
    assert (c.path, c.split, c.eval_path, c.eval_split) == (
        "org/data", "test", "org/other", "validation")
    with pytest.raises(ConfigError, match="names split 'test' but data.split='dev'"):
        DataConfig(path="org/data:test", split="dev")
    with pytest.raises(ConfigError, match="expected NAME or NAME:SPLIT"):
        DataConfig(path="org/data:en:test")
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match="data.subset='en': .* is a single file"):
        load_rows(DataConfig(path=str(tmp_path / "d.jsonl"), subset="en"))
