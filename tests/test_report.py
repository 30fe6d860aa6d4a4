"""`distalign report` on hand-written fixture run directories (tests/fixtures/runs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distalign.errors import ConfigError, DataError
from distalign.eval.report import aggregate, find_runs, load_run, markdown, metric_label, report

RUNS = Path(__file__).parent / "fixtures" / "runs"


def test_finds_every_run_directory_recursively():
    names = [p.name for p in find_runs([RUNS])]
    assert names == ["dpo-s0", "dpo-s1", "pmle-s0", "pmle-s1", "rkl-s0-interrupted"]


def test_interrupted_run_falls_back_to_last_logged_values():
    run = load_run(RUNS / "rkl-s0-interrupted")
    assert run.method == "rkl" and run.seed == 0 and run.name == "rkl-s0"
    assert not run.complete and load_run(RUNS / "dpo-s0").complete
    # the last row with each key wins; "time" is bookkeeping, not a metric
    assert run.metrics["synthetic/kl_fwd"] == 0.25
    assert run.metrics["loss"] == 1.0
    assert "time" not in run.metrics


def test_table_two_shape_mean_and_sample_std(tmp_path):
    metrics = ["synthetic/win_ref", "synthetic/kl_fwd"]
    table, rows = report([RUNS], metrics, plot_path=tmp_path / "r.png", include_incomplete=True)
    assert [r.label for r in rows] == ["DPO", "PMLE", "Reverse KL"]  # Table 2's row order
    dpo = rows[0].stats["synthetic/kl_fwd"]
    assert dpo[0] == pytest.approx(0.6) and dpo[1] == pytest.approx(0.1414213562) and dpo[2] == 2
    assert rows[2].stats["synthetic/kl_fwd"] == (0.25, 0.0, 1)
    lines = table.splitlines()
    assert lines[4].endswith(" | 0.250 | 1 (single run, 1 incomplete) |")
    assert lines[0] == "| Algorithm | win-rate vs π₀ ↑ | KL(π*‖π) ↓ | runs |"
    assert lines[3] == "| PMLE | 0.560 ± 0.014 | 0.320 ± 0.028 | 2 |"
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_default_metrics_and_group_by_config_key():
    table, rows = report([RUNS / "pmle-s0", RUNS / "pmle-s1", RUNS / "dpo-s0"],
                         group_by=["method", "algo.gamma"])
    assert "win-rate vs π₀ ↑" in table.splitlines()[0]
    assert [r.label for r in rows] == ["DPO (algo.gamma=0.05)", "PMLE (algo.gamma=1.0)"]


def test_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no run directories"):
        find_runs([tmp_path])
    with pytest.raises(DataError, match="no such run directory"):
        find_runs([tmp_path / "missing"])
    runs = [load_run(p) for p in find_runs([RUNS])]
    with pytest.raises(ConfigError, match="'eval/nope' is in none of the runs"):
        aggregate(runs, ["eval/nope"])
    with pytest.raises(ConfigError, match="--group-by 'algo.eta'"):
        aggregate(runs, ["loss"], ["algo.eta"])
    bad = tmp_path / "bad"
    shutil.copytree(RUNS / "dpo-s0", bad)
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(DataError, match="summary.json: invalid JSON"):
        load_run(bad)


def test_markdown_marks_missing_metric_cells():
    runs = [load_run(RUNS / "rkl-s0-interrupted"), load_run(RUNS / "dpo-s0")]
    rows = aggregate(runs, ["loss"])
    assert markdown(rows, ["loss"]).splitlines()[2] == "| DPO | 0.300 | 1 (single run) |"


def test_cli_report_writes_table_and_plot(tmp_path, capsys):
    from distalign.cli import main

    out = tmp_path / "table.md"
    main(["report", str(RUNS), "--metrics", "synthetic/kl_fwd,synthetic/kl_ref", "--out", str(out),
          "--include-incomplete"])
    text = capsys.readouterr().out
    assert "| Reverse KL | 0.250 | 0.050 | 1 (single run, 1 incomplete) |" in text
    assert "± 0.000" not in text
    assert out.read_text().startswith("| Algorithm |")
    assert out.with_suffix(".png").exists()


def _run(root: Path, name: str, method: str, seed: int, algo: dict, metrics: dict,
         data: str = "pairs.jsonl", eval_metrics: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {"method": method, "run": {"name": name, "seed": seed, "output_dir": str(root)},
           "algo": algo, "data": {"path": data}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "summary.json").write_text(json.dumps({"method": method, "seed": seed,
                                                "metrics": metrics}))
    if eval_metrics is not None:
        (d / "eval").mkdir()
        (d / "eval" / "eval.json").write_text(json.dumps({"metrics": eval_metrics}))
    return d


def test_groups_by_differing_config_keys_and_reads_eval_json(tmp_path):
    """PMLE β=0 and β=0.1 are two rows; seeds spelled in data paths do not split a group;
    eval/eval.json's metrics are read and are the default columns."""
    for seed in (0, 1, 2):
        ev = {"eval/win_rate": 50.0 + seed, "eval/rm_score": 1.0 + seed, "eval/kl_ref": 0.1}
        _run(tmp_path, f"pmle-b01-s{seed}", "pmle", seed, {"beta": 0.1}, {"loss": 1.0},
             f"data/n256-s{seed}/pairs.jsonl", ev)
    _run(tmp_path, "pmle-b0-s0", "pmle", 0, {"beta": 0.0}, {"loss": 1.0},
         "data/n256-s0/pairs.jsonl",
         {"eval/win_rate": 40.0, "eval/rm_score": 0.5, "eval/kl_ref": 0.3})
    _run(tmp_path, "dpo-s0", "dpo", 0, {"gamma": 0.1}, {"loss": 1.0}, "data/n256-s0/pairs.jsonl",
         {"eval/win_rate": 45.0, "eval/rm_score": 0.7, "eval/kl_ref": 0.2})
    assert len(find_runs([tmp_path])) == 5  # the eval/ folders are not runs of their own
    table, rows = report([tmp_path])
    # the whole key, section included: `beta` alone could be algo's or another section's
    assert [r.label for r in rows] == ["DPO", "PMLE (algo.beta=0.0)", "PMLE (algo.beta=0.1)"]
    lines = table.splitlines()
    assert lines[0] == "| Algorithm | win-rate % ↑ | RM score ↑ | KL(π‖π₀) ↓ | runs |"
    assert lines[3] == "| PMLE (algo.beta=0.0) | 40.000 | 0.500 | 0.300 | 1 (single run) |"
    assert lines[4] == ("| PMLE (algo.beta=0.1) | 51.000 ± 1.000 | 2.000 ± 1.000 | 0.100 ± 0.000 "
                        "| 3 |")
    # a different data size is a different experiment
    _run(tmp_path, "pmle-b01-n512", "pmle", 0, {"beta": 0.1}, {"loss": 1.0},
         "data/n512-s0/pairs.jsonl", {"eval/win_rate": 60.0})
    labels = [r.label for r in report([tmp_path])[1]]
    assert "PMLE (algo.beta=0.1, data.path=data/n512-s*/pairs.jsonl)" in labels


def test_incomplete_runs_left_out_by_default_and_noted():
    table, rows = report([RUNS], ["synthetic/kl_fwd"])
    assert [r.label for r in rows] == ["DPO", "PMLE"]
    assert "Left out (incomplete" in table and "rkl-s0-interrupted" in table
    with pytest.raises(DataError, match="every run found is incomplete"):
        report([RUNS / "rkl-s0-interrupted"], ["loss"])


def test_cli_report_subprocess_output_to_file(tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "distalign", "report", str(RUNS), "--metrics",
                             "synthetic/kl_fwd", "--out", str(tmp_path / "t.md")],
                            stdout=f, stderr=f).returncode
    assert rc == 0, log.read_text()
    assert "| DPO | 0.600 ± 0.141 | 2 |" in log.read_text()
    res = subprocess.run([sys.executable, "-m", "distalign", "report", str(RUNS), "--metrics",
                          "eval/nope"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: metric 'eval/nope'")


def test_torn_last_metrics_line_is_dropped_but_a_torn_middle_line_is_an_error(tmp_path):
    run = tmp_path / "rkl"
    shutil.copytree(RUNS / "rkl-s0-interrupted", run)
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 99, "loss": 7')  # killed while writing
    assert load_run(run).metrics["loss"] == 1.0  # the last complete row still wins
    metrics.write_text('{"step": 0, "lo\n' + good)
    with pytest.raises(DataError, match="metrics.jsonl line 1: invalid JSON"):
        load_run(run)


def test_an_evaluation_only_folder_is_the_base_row_and_comes_first(tmp_path):
    """The pipeline's π₀ folder has generations and eval/eval.json but no training run."""
    shutil.copytree(RUNS / "dpo-s0", tmp_path / "dpo-s0")
    base = tmp_path / "base" / "eval"
    base.mkdir(parents=True)
    (base / "eval.json").write_text(json.dumps({"metrics": {"synthetic/kl_fwd": 0.9}}))
    runs = [load_run(p) for p in find_runs([tmp_path])]
    rows = aggregate(runs, ["synthetic/kl_fwd"])
    assert [r.label for r in rows] == ["π₀ (base)", "DPO"]
    assert rows[0].stats["synthetic/kl_fwd"][0] == 0.9


def test_a_judged_column_is_titled_by_its_metric_and_judge() -> None:
    assert metric_label("eval/win_rate") == "win-rate % ↑"
    assert metric_label("eval/win_rate@hf") == "win-rate % ↑ [hf]"
    assert metric_label("custom/thing@x") == "custom/thing@x"  # unknown: the key as written


def test_a_negative_k1_kl_shows_its_standard_error_and_a_note(tmp_path):
    """k1 is a Monte-Carlo mean of log-ratios: below 0 by noise, never in truth."""
    _run(tmp_path, "dpo-s0", "dpo", 0, {"gamma": 0.1}, {"loss": 1.0},
         eval_metrics={"eval/kl_ref": -0.02, "eval/kl_ref_se": 0.03})
    _run(tmp_path, "pmle-s0", "pmle", 0, {"beta": 0.0}, {"loss": 1.0},
         eval_metrics={"eval/kl_ref": 0.5, "eval/kl_ref_se": 0.1})
    for seed, kl in ((0, -0.0001), (1, -0.0002)):
        _run(tmp_path, f"rkl-s{seed}", "rkl", seed, {"beta": 0.1}, {"loss": 1.0},
             eval_metrics={"eval/kl_ref": kl, "eval/kl_ref_se": 0.004})
    table, _ = report([tmp_path], ["eval/kl_ref"])
    lines = table.splitlines()
    assert lines[2] == "| DPO | -0.020 (SE 0.030) | 1 (single run) |"
    assert lines[3] == "| PMLE | 0.500 | 1 (single run) |"  # positive: no SE, as before
    # a mean that rounds to zero prints no "-0.000" (and needs no SE)
    assert lines[4] == "| Reverse KL | 0.000 ± 0.000 | 2 |"
    assert "true KL is ≥ 0" in table and "standard error (SE) of 0" in table
    table, _ = report([tmp_path / "pmle-s0"], ["eval/kl_ref"])
    assert "true KL" not in table  # no negative cell, no note


def test_the_plot_fits_long_labels_without_a_layout_warning(tmp_path):
    import warnings

    for seed, beta in ((0, 0.1), (1, 0.2), (2, 0.3)):
        _run(tmp_path, f"pmle-{seed}", "pmle", seed, {"beta": beta, "kl_samples": seed + 1},
             {"loss": 1.0}, f"data/a-very-long-folder-name/n{seed}/pairs.jsonl",
             {"eval/kl_ref": 0.1, "eval/rm_score": 0.2, "eval/win_rate": 50.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Tight layout not applied" included
        table, rows = report([tmp_path], plot_path=tmp_path / "r.png")
    assert "algo.kl_samples=1" in rows[0].label
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_cli_report_to_an_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "file.txt"  # a file where a folder should be (root ignores modes)
    blocker.write_text("x")
    for flag in ("--out", "--plot"):
        proc = subprocess.run([sys.executable, "-m", "distalign", "report", str(RUNS), flag,
                               str(blocker / "r.png")], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "is a file" in proc.stderr and flag in proc.stderr
