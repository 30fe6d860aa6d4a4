"""`distalign pipeline`: the runner (skip, fingerprints, dependencies), the seeded split, a
tiny end-to-end pipeline, resume after a real ``kill -9``, ``--dry-run`` and bad input."""

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

from distalign.errors import ConfigError
from distalign.pipeline.runner import Stage, run_stages, status
from distalign.pipeline.stages import split_pairs

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "configs" / "pipelines"


# ------------------------------------------------------------------------------ runner
def count_call(out: str, value: int) -> dict:
    """A stage for the runner tests: appends to a call log and returns ``value``."""
    log = Path(out) / "calls.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"{value}\n")
    return {"value": value}


def _stages(tmp: Path, a_value: int = 1) -> list[Stage]:
    target = "test_pipeline:count_call"
    return [
        Stage("a", "train", target, {"out": str(tmp / "a"), "value": a_value}, tmp / "a"),
        Stage("b", "eval", target, {"out": str(tmp / "b"), "value": 2}, tmp / "b", deps=("a",)),
    ]


def _calls(d: Path) -> list[str]:
    return (d / "calls.txt").read_text().split()


def test_runner_skips_done_stages_and_reruns_changed_ones_downstream(tmp_path):
    first = run_stages(_stages(tmp_path), log=lambda _: None)
    assert {k: v.result for k, v in first.items()} == {"a": {"value": 1}, "b": {"value": 2}}
    again = run_stages(_stages(tmp_path), log=lambda _: None)
    assert all(o.reused for o in again.values())
    assert again["a"].result == {"value": 1}  # read back from the done marker
    # each marker times its stage: wall and CPU seconds, and the load beside it
    mark = json.loads((tmp_path / "a" / ".done.train.json").read_text())
    assert mark["seconds"] >= 0 and mark["cpu_seconds"] >= 0 and len(mark["load"]) == 2
    assert mark["resumed"] is False and again["a"].timing["seconds"] == mark["seconds"]
    # and the host's speed, measured once per invocation before its first stage ran
    marks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/.done.*.json"))]
    assert marks[0]["host"] == marks[1]["host"] and marks[0]["host"]["gflops"] > 0
    assert again["a"].timing["host"] == mark["host"]
    assert _calls(tmp_path / "a") == ["1"] and _calls(tmp_path / "b") == ["2"]
    # a changes: a runs again, and b (whose input changed) too
    changed = _stages(tmp_path, a_value=5)
    assert [status(s) for s in changed] == ["changed", "changed"]
    run_stages(changed, log=lambda _: None)
    assert _calls(tmp_path / "a") == ["1", "5"] and _calls(tmp_path / "b") == ["2", "2"]
    # --only b with a done: only b runs (forced here by deleting its marker)
    (tmp_path / "b" / ".done.eval.json").unlink()
    out = run_stages(changed, only={"b"}, log=lambda _: None)
    assert out["a"].reused and not out["b"].reused
    assert _calls(tmp_path / "a") == ["1", "5"]


def test_a_stage_writing_into_another_stages_directory_is_partial_only_by_its_own_file(
        tmp_path):
    # generation writes into a finished run dir: the run's files do not make it "resuming"
    gen = Stage("generate/x", "generate", "test_pipeline:count_call", {}, tmp_path,
                started="generations.jsonl")
    (tmp_path / "summary.json").write_text("{}")
    assert status(gen) == "todo"
    (tmp_path / "generations.jsonl").write_text("")
    assert status(gen) == "partial"


def test_runner_in_worker_processes_respects_dependencies(tmp_path):
    target = "test_pipeline:count_call"
    stages = [Stage(f"s{i}", "train", target, {"out": str(tmp_path / f"s{i}"), "value": i},
                    tmp_path / f"s{i}", deps=("root",)) for i in range(3)]
    stages.insert(0, Stage("root", "data", target, {"out": str(tmp_path / "root"), "value": 9},
                           tmp_path / "root"))
    done: list[str] = []
    out = run_stages(stages, workers=2, log=lambda _: None,
                     on_done=lambda o: done.append(o.stage.name))
    assert done[0] == "root" and sorted(done[1:]) == ["s0", "s1", "s2"]
    assert {k: v.result["value"] for k, v in out.items()} == {"root": 9, "s0": 0, "s1": 1,
                                                              "s2": 2}
    again = run_stages(stages, workers=2, log=lambda _: None)
    assert all(o.reused for o in again.values())


def test_runner_rejects_unknown_dependencies_and_cycles(tmp_path):
    a, b = _stages(tmp_path)
    with pytest.raises(ConfigError, match="'b' depends on 'x', which is not a stage"):
        run_stages([a, Stage("b", "eval", b.target, b.spec, b.out, deps=("x",))])
    with pytest.raises(ConfigError, match="depends on itself"):
        run_stages([Stage("a", "t", a.target, a.spec, a.out, deps=("b",)), b])
    assert not (tmp_path / "a").exists()  # checked before anything ran


def test_runner_marker_is_written_only_after_the_stage_returns(tmp_path):
    bad = Stage("a", "train", "test_pipeline:count_call", {"out": str(tmp_path), "value": "x",
                                                           "nope": 1}, tmp_path)
    with pytest.raises(TypeError):
        run_stages([bad], log=lambda _: None)
    assert not bad.marker.exists() and status(bad) != "done"


# ------------------------------------------------------------------------------- split
def test_split_is_seeded_disjoint_and_complete(tmp_path):
    src = tmp_path / "pairs.jsonl"
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: a{i}",
             "rejected": f"\n\nHuman: q{i}\n\nAssistant: b{i}"} for i in range(50)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r1 = split_pairs(str(src), str(tmp_path / "s1"), seed=3, heldout=10)
    r2 = split_pairs(str(src), str(tmp_path / "s2"), seed=3, heldout=10)
    r3 = split_pairs(str(src), str(tmp_path / "s3"), seed=4, heldout=10, train=20)
    assert r1["sha256"] == r2["sha256"] and r1["sha256"] != r3["sha256"]
    held = [json.loads(x) for x in (tmp_path / "s1" / "heldout.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "s1" / "train.jsonl").read_text().splitlines()]
    assert len(held) == 10 and len(train) == 40 and r3["train"] == 20
    assert {r["id"] for r in held}.isdisjoint({r["id"] for r in train})
    assert sorted(int(r["id"]) for r in held + train) == list(range(50))
    for r in held:  # rows are the source rows, unchanged
        assert rows[int(r["id"])] == {k: r[k] for k in ("chosen", "rejected")}


def test_split_writes_conversational_pairs_with_an_explicit_prompt(tmp_path):
    """TRL's implicit-prompt message lists become prompt/chosen/rejected; a pair whose two
    dialogues differ before the last turn has no common prompt and is left out, counted."""
    def turn(role: str, text: str) -> dict:
        return {"role": role, "content": text}

    rows = [{"chosen": [turn("user", f"q{i}"), turn("assistant", f"a{i}")],
             "rejected": [turn("user", f"q{i}"), turn("assistant", f"b{i}")]} for i in range(9)]
    rows.append({"chosen": [turn("user", "x"), turn("assistant", "a")],
                 "rejected": [turn("user", "y"), turn("assistant", "b")]})
    src = tmp_path / "conv.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = split_pairs(str(src), str(tmp_path / "s"), seed=0, heldout=3, format="preference")
    assert result["prompt_mismatch"] == 1 and result["source_rows"] == 10
    held = [json.loads(x) for x in (tmp_path / "s" / "heldout.jsonl").read_text().splitlines()]
    for r in held:
        i = int(r["id"])
        assert r["prompt"] == [turn("user", f"q{i}")]
        assert r["chosen"] == [turn("assistant", f"a{i}")]
        assert r["rejected"] == [turn("assistant", f"b{i}")]


def test_an_hh_pipeline_keeps_its_stage_fingerprints():
    """The data stage's layout is read from the file; an HH pipeline's specs stay as they were
    (no format key), so its finished stages are not run again."""
    from distalign.pipeline.config import load_pipeline
    from distalign.pipeline.plan import plan

    p = plan(load_pipeline(PIPELINES / "hh-smollm2-quick.yaml"), dry_run=True)
    stages = {s.name: s for s in p.stages}
    assert "format" not in stages["data"].spec
    assert stages["dpo-s0"].spec["config"]["data"]["format"] == "hh"
    assert stages["generate/base"].spec["fmt"] == "hh"


def test_default_pmle_samples_nothing():
    """β = 0 by default (Table 6): no sampler and no π₀; the TL;DR recipe keeps Table 5's."""
    from distalign.methods.pmle import PMLE, PMLEConfig
    from distalign.train import load_config
    from distalign.train.setup import build_sampler

    cfg = load_config("pmle", {"model": {"name_or_path": "x"}, "data": {"path": "y"}})
    assert cfg.algo.beta == 0 and PMLEConfig().beta == 0
    assert not PMLE.needs_reference(cfg.algo)
    assert build_sampler(cfg, PMLE, tokenizer=None) is None
    recipe = yaml.safe_load((REPO / "configs" / "paper" / "tldr" / "pmle.yaml").read_text())
    assert recipe["algo"]["beta"] == 1e-5


# ---------------------------------------------------------------------- tiny pipelines
def _config(tiny, out: Path, **extra) -> dict:
    cfg = {
        "name": "tiny",
        "output_dir": str(out),
        "base": {"name_or_path": str(tiny.policy)},
        "data": {"split": {"source": str(tiny.pairs), "seed": 0, "heldout": 4,
                           "format": "preference"}},
        "defaults": {"gen": {"max_new_tokens": 6, "temperature": 0.7}, "optim": {"lr": 1e-3},
                     "run": {"batch_size": 4, "max_steps": 3, "save_every": 1,
                             "progress": False}},
        "reward": {},
        "methods": {"dpo": {"config": {"algo": {"gamma": 0.1}}},
                    "rlhf": {"config": {"algo": {"beta": 0.05, "update_epochs": 1}}}},
        "seeds": [0],
        "generate": {"batch_size": 4},
        "eval": {"judges": {"rm": "reward:{reward}"}},
    }
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def _main(args: list[str]) -> None:
    from distalign.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    assert exc.value.code == 0


def _eval_metrics(out: Path) -> dict[str, dict]:
    return {d.parent.parent.name: json.loads(d.read_text())["metrics"]
            for d in sorted(out.glob("*/eval/eval.json"))}


def test_tiny_pipeline_end_to_end_report_and_skip(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = _write(tmp_path / "p.yaml", _config(tiny, out))
    _main(["pipeline", str(cfg)])
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["π₀ (base)", "DPO", "RLHF"]  # π₀ first, then Table 2's order
    evals = _eval_metrics(out)
    assert set(evals) == {"base", "dpo-s0", "rlhf-s0"}
    # the table's numbers are the eval.json numbers (one seed: mean = value, std = 0)
    for row, name in zip(report["rows"], ("base", "dpo-s0", "rlhf-s0"), strict=True):
        for key in ("eval/win_rate", "eval/rm_score", "eval/kl_ref"):
            assert row["stats"][key]["mean"] == pytest.approx(evals[name][key], abs=1e-12)
    assert evals["base"]["eval/kl_ref"] == pytest.approx(0.0, abs=1e-6)  # π₀ against itself
    assert "| π₀ (base) |" in text and "Reward model: held-out pair accuracy" in text
    assert report["reward_accuracy"] is not None
    # every stage wrote a marker; a rerun runs nothing
    _main(["pipeline", str(cfg)])
    assert "0 stages run, 12 already done" in capsys.readouterr().out
    # the online run's rollout curves: a plot in its run dir, and its last values in the report
    assert (out / "rlhf-s0" / "curves.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (out / "rlhf-s0" / "metrics.jsonl").read_text().split("\n")
            if x]
    last = [r for r in rows if "env/entropy" in r][-1]
    assert f"{last['env/entropy']:.3f}" in (out / "report.md").read_text()


def test_kill_9_then_rerun_equals_an_uninterrupted_pipeline(tiny, tmp_path):
    """A real SIGKILL mid-training; the rerun resumes from the checkpoint and every result
    (training summaries, generations, eval numbers) equals an uninterrupted pipeline's."""
    long = {"run": {"max_steps": 40, "save_every": 4}}
    methods = {"dpo": {"config": {"algo": {"gamma": 0.1}, **long}}}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _main(["pipeline", str(_write(tmp_path / "c.yaml", _config(tiny, clean, methods=methods)))])
    cfg = _write(tmp_path / "k.yaml", _config(tiny, killed, methods=methods))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distalign", "pipeline", str(cfg)]
    run_dir = killed / "dpo-s0"
    with (tmp_path / "log1.txt").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step-8").exists():
            assert proc.poll() is None, (tmp_path / "log1.txt").read_text()
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "reward" / ".done.reward.json").exists()
    assert not (run_dir / ".done.train.json").exists()  # killed mid-stage
    with (tmp_path / "log2.txt").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    text = (tmp_path / "log2.txt").read_text()
    assert rc == 0, text
    assert "dpo-s0: resuming" in text and "▶ reward" not in text
    assert json.loads((run_dir / ".done.train.json").read_text())["resumed"] is True
    assert "| dpo-s0 (resumed: this attempt) |" in (killed / "report.md").read_text()
    def summary(d: Path) -> dict:
        m = json.loads((d / "summary.json").read_text())["metrics"]
        return {k: v for k, v in m.items() if "time" not in k and k != "tokens_per_s"}

    for name in ("reward", "dpo-s0"):
        assert summary(killed / name) == pytest.approx(summary(clean / name), rel=1e-5,
                                                       abs=1e-7), name
    for name in ("base", "dpo-s0"):
        rows = [(json.loads(x)["prompt_id"], json.loads(x)["output_token_ids"]) for d in
                (clean, killed) for x in (d / name / "generations.jsonl").read_text().split("\n")
                if x]
        half = len(rows) // 2
        assert sorted(rows[:half]) == sorted(rows[half:]), name
    clean_eval, killed_eval = _eval_metrics(clean), _eval_metrics(killed)
    assert set(killed_eval) == set(clean_eval) == {"base", "dpo-s0"}
    for name, metrics in clean_eval.items():
        assert killed_eval[name] == pytest.approx(metrics, rel=1e-5, abs=1e-7), name


ACCELERATE_CPU = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--cpu"]


@pytest.mark.parametrize("launcher", [{"kind": "subprocess"},
                                      {"kind": "accelerate", "args": ACCELERATE_CPU}],
                         ids=["subprocess", "accelerate"])
def test_launchers_run_training_stages_in_child_processes(launcher, tiny, tmp_path):
    cfg = _config(tiny, tmp_path / "out", launcher=launcher,
                  methods={"dpo": {}}, generate=None, eval=None, reward=None)
    _main(["pipeline", str(_write(tmp_path / "p.yaml", cfg))])
    mark = json.loads((tmp_path / "out" / "dpo-s0" / ".done.train.json").read_text())
    summary = json.loads((tmp_path / "out" / "dpo-s0" / "summary.json").read_text())
    assert mark["result"] == summary["metrics"]  # the child's result came back
    assert (tmp_path / "out" / "report.md").is_file()


# ------------------------------------------------------------------- dry run, bad input
@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.stem)
def test_dry_run_of_shipped_pipelines_loads_no_model(path, tmp_path, monkeypatch, capsys):
    import distalign.lm.models as models

    def refuse(*a, **k):
        raise AssertionError("a dry run loaded a model or tokenizer")

    for name in ("load_policy", "load_tokenizer", "load_scorer"):
        monkeypatch.setattr(models, name, refuse)
    monkeypatch.chdir(tmp_path)
    _main(["pipeline", str(path), "--dry-run"])
    text = capsys.readouterr().out
    assert "report" in text and "todo" in text
    assert not (tmp_path / "runs").exists()  # nothing written


BAD = [
    ({"judge": "x"}, "unknown key 'judge'"),
    ({"methods": {"ppo": {}}}, "unknown stage 'methods.ppo'"),
    ({"base": {"name_or_path": None}}, "the base model π₀ is missing"),
    ({"base": {"name_or_path": "./nowhere"}}, "no such model directory"),
    ({"generate": None}, "stage 'eval' depends on stage 'generate', which is missing"),
    ({"reward": None}, "stage 'rlhf-s0' depends on stage 'reward', which is missing"),
    ({"methods": {"dpo": {"config": {"algo": {"gama": 1}}}}}, "stage 'dpo-s0'"),
    ({"launcher": {"kind": "slurm"}}, "p.yaml: launcher.kind='slurm'"),
    ({"eval": {"judges": {"rm": "reward:{reward}"}, "judge_prompts": {"gpt": 4}}},
     "eval.judge_prompts names 'gpt', which is not a judge"),
    ({"eval": {"judges": {"rm": "reward:{reward}"}, "judge_prompts": {"rm": 0}}},
     "eval.judge_prompts.rm must be an integer >= 1"),
    ({"methods": {"dpo": {"recipe": "nowhere.yaml"}}}, "recipe not found: nowhere.yaml"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_pipeline_configs_fail_in_one_line_before_training(change, message, tiny, tmp_path,
                                                              capsys):
    from distalign.cli import main

    cfg = _config(tiny, tmp_path / "out")
    for k, v in change.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and k == "base" else v
    with pytest.raises(SystemExit) as exc:
        main(["pipeline", str(_write(tmp_path / "p.yaml", cfg))])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_inconsistent_reward_tokenizer_and_bad_flags(tiny, tmp_path, capsys):
    from distalign.cli import main
    from distalign.testing import save_tiny, tiny_reward_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_tokens(["zebra"])  # one more id: the policy's ids would be misread
    other = tmp_path / "other_rm"
    save_tiny(tok, other)
    save_tiny(tiny_reward_model(tok, seed=3), other)
    capsys.readouterr()  # the save's own progress output
    cfg = _write(tmp_path / "p.yaml", _config(tiny, tmp_path / "out",
                                              reward={"model": str(other)}))
    for args, message in (
        ([str(cfg)], "does not share the tokenizer"),
        ([str(_write(tmp_path / "q.yaml", _config(tiny, tmp_path / "out"))), "--only", "nope"],
         "--only: unknown stage 'nope'"),
        ([str(tmp_path / "q.yaml"), "--only", "dpo"], "depends on stage 'data', which is not"),
        ([str(tmp_path / "q.yaml"), "--methods", "pmle"], "--methods: unknown stage 'pmle'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["pipeline", *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
