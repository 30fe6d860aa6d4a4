"""`distalign report` on hand-written fixture run directories (tests/fixtures/runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distalign.errors import ConfigError, DataError
from distalign.eval.report import aggregate, find_runs, load_run, markdown, report

RUNS = Path(__file__).parent / "fixtures" / "runs"


def test_finds_every_run_directory_recursively():
    names = [p.name for p in find_runs([RUNS])]
    assert names == ["dpo-s0", "dpo-s1", "pmle-s0", "pmle-s1", "rkl-s0-interrupted"]


def test_interrupted_run_falls_back_to_last_logged_values():
    run = load_run(RUNS / "rkl-s0-interrupted")
    assert run.method == "rkl" and run.seed == 0 and run.name == "rkl-s0"
    # the last row with each key wins; "time" is bookkeeping, not a metric
    assert run.metrics["synthetic/kl_fwd"] == 0.25
    assert run.metrics["loss"] == 1.0
    assert "time" not in run.metrics


def test_table_two_shape_mean_and_sample_std(tmp_path):
    metrics = ["synthetic/win_ref", "synthetic/kl_fwd"]
    table, rows = report([RUNS], metrics, plot_path=tmp_path / "r.png")
    assert [r.label for r in rows] == ["DPO", "PMLE", "Reverse KL"]  # Table 2's row order
    dpo = rows[0].stats["synthetic/kl_fwd"]
    assert dpo[0] == pytest.approx(0.6) and dpo[1] == pytest.approx(0.1414213562) and dpo[2] == 2
    assert rows[2].stats["synthetic/kl_fwd"] == (0.25, 0.0, 1)
    lines = table.splitlines()
    assert lines[0] == "| Algorithm | win-rate vs π₀ ↑ | KL(π*‖π) ↓ | runs |"
    assert lines[3] == "| PMLE | 0.560 ± 0.014 | 0.320 ± 0.028 | 2 |"
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_default_metrics_and_group_by_config_key():
    table, rows = report([RUNS / "pmle-s0", RUNS / "pmle-s1", RUNS / "dpo-s0"],
                         group_by=["method", "algo.gamma"])
    assert "win-rate vs π₀ ↑" in table.splitlines()[0]
    assert [r.label for r in rows] == ["DPO (gamma=0.05)", "PMLE (gamma=1.0)"]


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
    assert markdown(rows, ["loss"]).splitlines()[2] == "| DPO | 0.300 ± 0.000 | 1 |"


def test_cli_report_writes_table_and_plot(tmp_path, capsys):
    from distalign.cli import main

    out = tmp_path / "table.md"
    main(["report", str(RUNS), "--metrics", "synthetic/kl_fwd,synthetic/kl_ref", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| Reverse KL | 0.250 ± 0.000 | 0.050 ± 0.000 | 1 |" in text
    assert out.read_text().startswith("| Algorithm |")
    assert out.with_suffix(".png").exists()
