"""What a new user hit in ``distalign pipeline``, replayed through the real CLI in subprocesses:
preference JSONL (text and TRL's conversational forms) through every stage, a pipeline of π₀
alone, ``--only base``, ``--only`` checked by ``--dry-run`` (with "did you mean"), the
``--overwrite`` that the engine's hint names, an unwritable output directory, and the reward
model's accuracy as the last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Each P1 goes through the real CLI in a subprocess once; its variants run in this process
# (``_main``), since every CLI process pays torch's and transformers' imports again.


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distalign", "pipeline", *args],
                          capture_output=True, text=True, env=ENV, timeout=600)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """``distalign pipeline ARGS`` in this process: (exit status, stdout, stderr)."""
    from distalign.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["pipeline", *args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _main_error(capsys, words: str, *args: str) -> None:
    code, _, err = _main(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert words in err, err


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _one_line(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and words in proc.stderr, proc.stderr


def _pipeline(tiny, tmp_path: Path, name: str = "p", source: Path | None = None,
              **extra) -> Path:
    """A tiny pipeline; the pairs file's layout is left to be read from the file."""
    cfg = {
        "name": name,
        "output_dir": str(tmp_path / f"out-{name}"),
        "base": {"name_or_path": str(tiny.policy)},
        "data": {"split": {"source": str(source or tiny.pairs), "seed": 0, "heldout": 4}},
        "defaults": {"gen": {"max_new_tokens": 6, "temperature": 0.7}, "optim": {"lr": 1e-3},
                     "run": {"batch_size": 4, "max_steps": 2, "save_every": 1,
                             "progress": False}},
        "methods": {"dpo": {"config": {"algo": {"gamma": 0.1}}}},
        "seeds": [0],
        "generate": {"batch_size": 4},
        "eval": {"judges": {}, "reward_model": None},
    }
    cfg.update(extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preference_jsonl_runs_every_stage_and_the_rm_accuracy_is_the_last_line(tiny,
                                                                                 tmp_path):
    """prompt/chosen/rejected rows with no data.split.format (it used to default to HH and
    fail after the data stage); the RM's held-out accuracy closes the output."""
    cfg = _pipeline(tiny, tmp_path, reward={}, eval={"judges": {"rm": "reward:{reward}"}})
    out = _ok(_cli(str(cfg)))
    root = tmp_path / "out-p"
    assert json.loads((root / "data" / "train.jsonl").read_text().splitlines()[0])["prompt"]
    assert (root / "dpo-s0" / "eval" / "eval.json").is_file()
    last = out.strip().splitlines()[-1]
    assert last.startswith("Reward model: held-out pair accuracy ") and " on 4 pairs (95% " in last
    assert last.split(": ")[-1].startswith("at chance")  # 4 pairs: any accuracy is chance


def test_trl_conversational_pairs_without_a_prompt_column(tiny, tmp_path, capsys):
    rows = [json.loads(x) for x in tiny.pairs.read_text().splitlines()]
    conv = _write_jsonl(tmp_path / "conv.jsonl", [
        {"chosen": [{"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "user", "content": r["prompt"]},
                      {"role": "assistant", "content": r["rejected"]}]} for r in rows])
    code, out, err = _main(capsys, str(_pipeline(tiny, tmp_path, "conv", conv)))
    assert code == 0, out + err
    root = tmp_path / "out-conv"
    held = [json.loads(x) for x in (root / "data" / "heldout.jsonl").read_text().splitlines()]
    assert held[0]["prompt"][0]["role"] == "user" and len(held[0]["chosen"]) == 1
    gens = [json.loads(x) for x in (root / "dpo-s0" / "generations.jsonl").read_text().split("\n")
            if x]
    assert len(gens) == 4 and {g["prompt_id"] for g in gens} == {r["id"] for r in held}


def test_a_pairs_file_in_no_known_layout_is_refused_by_the_dry_run(tiny, tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 8)
    _one_line(_cli(str(_pipeline(tiny, tmp_path, "qa", bad)), "--dry-run"),
              "expected JSON lines of prompt/chosen/rejected")
    text = _write_jsonl(tmp_path / "plain.jsonl", [{"chosen": "a b", "rejected": "a c"}] * 8)
    _main_error(capsys, "without HH", str(_pipeline(tiny, tmp_path, "plain", text)),
                "--dry-run")
    declared = _pipeline(tiny, tmp_path, "decl", data={"split": {
        "source": str(tiny.pairs), "heldout": 4, "format": "hh"}})
    _main_error(capsys, "data.split.format=hh, but", str(declared))
    assert not list(tmp_path.glob("out-*"))


def test_a_pipeline_of_base_alone_reports_in_every_form(tiny, tmp_path, capsys):
    evaluated = _pipeline(tiny, tmp_path, "pi0", methods={})
    out = _ok(_cli(str(evaluated)))
    assert "| π₀ (base) |" in out and (tmp_path / "out-pi0" / "report.png").is_file()
    generated = _pipeline(tiny, tmp_path, "gen", methods={}, eval=None)
    code, out, _ = _main(capsys, str(generated))
    assert code == 0 and "Nothing to tabulate" in out
    assert (tmp_path / "out-gen" / "base" / "generations.jsonl").is_file()
    bare = _pipeline(tiny, tmp_path, "bare", methods={}, eval=None, generate=None)
    code, out, _ = _main(capsys, str(bare))
    assert code == 0 and "Nothing to tabulate" in out


def test_only_base_picks_the_base_stage_alone(tiny, tmp_path, capsys):
    gguf = _pipeline(tiny, tmp_path, "gguf", base={"name_or_path": str(tiny.policy),
                                                   "gguf_file": "model.gguf"})
    code, out, _ = _main(capsys, str(gguf), "--dry-run", "--only", "base")
    assert code == 0 and out.strip().splitlines()[-1] == "--only: base"  # the export alone
    cfg = _pipeline(tiny, tmp_path, "rows", methods={})  # no export: π₀'s own row
    assert _main(capsys, str(cfg), "--only", "data")[0] == 0
    out = _ok(_cli(str(cfg), "--only", "base"))
    assert "--only: generate/base, eval/base" in out and "▶ eval/base" in out
    assert "▶ data" not in out and "▶ report" not in out


def test_only_is_checked_by_the_dry_run_with_did_you_mean(tiny, tmp_path, capsys):
    cfg = _pipeline(tiny, tmp_path, reward={})
    _one_line(_cli(str(cfg), "--dry-run", "--only", "rewrd"),
              "--only: unknown stage 'rewrd' (did you mean 'reward'?")
    _main_error(capsys, "depends on stage 'data'", str(cfg), "--dry-run", "--only", "dpo")
    assert not (tmp_path / "out-p").exists()


def test_overwrite_replaces_a_run_trained_with_another_config(tiny, tmp_path, capsys):
    """The engine's "rerun with --overwrite" hint names an option the pipeline now has."""
    first = _pipeline(tiny, tmp_path, generate=None, eval=None)
    assert _main(capsys, str(first))[0] == 0
    changed = _pipeline(tiny, tmp_path, generate=None, eval=None,
                        methods={"dpo": {"config": {"algo": {"gamma": 0.5}}}})
    _main_error(capsys, "rerun with --overwrite", str(changed))
    out = _ok(_cli(str(changed), "--overwrite"))
    assert "▶ dpo-s0" in out and "▶ data" not in out  # finished stages stay
    config = yaml.safe_load((tmp_path / "out-p" / "dpo-s0" / "config.yaml").read_text())
    assert config["algo"]["gamma"] == 0.5


def test_an_output_directory_that_cannot_be_written_is_one_line(tiny, tmp_path, capsys):
    blocker = tmp_path / "file.txt"  # a file where a directory should be (root ignores modes)
    blocker.write_text("x")
    _one_line(_cli(str(_pipeline(tiny, tmp_path, output_dir=str(blocker)))),
              f"output_dir {blocker}: is a file")
    cfg = _pipeline(tiny, tmp_path, output_dir=str(blocker / "sub"))
    for args in ((), ("--dry-run",)):
        _main_error(capsys, f"output_dir {blocker / 'sub'}: cannot write there", str(cfg), *args)
    assert blocker.read_text() == "x"


def test_a_full_disk_is_one_line_and_says_how_to_resume(capsys, monkeypatch):
    import errno

    from distalign.pipeline import config as pipeline_config

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline_config, "load_pipeline", full)
    code, _, err = _main(capsys, "any.yaml")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: no space left on device") and "rerun" in err, err
