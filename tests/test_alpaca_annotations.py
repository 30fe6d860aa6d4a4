"""AlpacaEval aggregation: hand cases, and AlpacaEval 2.0's published leaderboard numbers.

The 10 annotation files are read in place from ``../shared/data/alpaca-eval-annotations`` (CC
BY-NC data, never copied into this repository); those tests skip when the folder is absent.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from distalign.errors import DataError
from distalign.eval.annotations import aggregate_annotations, read_annotations
from distalign.eval.stats import mean_se, winrate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca-eval-annotations"

# AlpacaEval 2.0 (annotator weighted_alpaca_eval_gpt4_turbo, baseline gpt4_1106_preview), non-LC
# columns (win_rate, standard_error, discrete_win_rate, n_total), copied from
# github:tatsu-lab/alpaca_eval @ cd543a149df89434d8a54582c0151c0b945c3d20 :
# src/alpaca_eval/leaderboards/data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv
# (the commit the annotation files come from).
PUBLISHED = {
    "FuseChat-Llama-3.2-1B-Instruct": (
        29.9219322658882, 1.3934584328741797, 29.068322981366464, 805),
    "alpaca-7b": (2.591450540223603, 0.4870855382635108, 2.298136645962733, 805),
    "claude-2": (17.188240356708075, 1.17482825615589, 16.335403726708076, 805),
    "falcon-7b-instruct": (2.146617553167702, 0.454225792894195, 2.111801242236025, 805),
    "gemma-2b-it": (3.4019714381366457, 0.5389981250162534, 2.857142857142857, 805),
    "gpt-3.5-turbo-1106": (9.177964561962735, 0.8904117511864436, 8.198757763975156, 805),
    "oasst-sft-pythia-12b": (1.790114083180124, 0.3985580883049341, 1.7391304347826086, 805),
    "phi-2": (2.350209543026152, 0.4496590405673333, 2.054794520547945, 803),
    "vicuna-7b-v1.5": (4.797493939167703, 0.6655960676971918, 4.53416149068323, 805),
}
# text_davinci_003 has no row in that leaderboard (it was AlpacaEval 1's baseline), so its file
# is checked against an independent pandas computation of AlpacaEval's rule instead.
UNPUBLISHED = ("text_davinci_003",)


def test_winrate_rules_by_hand():
    # 2 → win, 1 → loss, 1.5 and legacy 0 → tie, 1.7 → soft 0.7 / discrete win,
    # NaN, None and 2.5 are not preferences: dropped and counted
    out = winrate([2.0, 1.0, 1.5, 0, 1.7, math.nan, None, 2.5], bootstrap=False)
    soft = [1.0, 0.0, 0.5, 0.5, 0.7]
    assert out["win_rate"] == pytest.approx(100 * sum(soft) / 5)
    sd = math.sqrt(sum((s - 0.54) ** 2 for s in soft) / 4)
    assert out["standard_error"] == pytest.approx(100 * sd / math.sqrt(5))
    assert out["discrete_win_rate"] == pytest.approx(100 * (1 + 0 + 0.5 + 0.5 + 1) / 5)
    assert (out["n_wins"], out["n_wins_base"], out["n_draws"]) == (2, 1, 2)
    assert (out["n_total"], out["n_dropped"]) == (5, 3)


def test_bootstrap_ci_brackets_the_mean():
    prefs = [1.0 + (i % 10) / 9 for i in range(200)]
    out = winrate(prefs)
    assert out["ci_low"] < out["win_rate"] < out["ci_high"]
    # the 95 % interval is about ±1.96 standard errors wide
    width = out["ci_high"] - out["ci_low"]
    assert width == pytest.approx(2 * 1.96 * out["standard_error"], rel=0.15)
    assert mean_se([3.0]) == (3.0, pytest.approx(float("nan"), nan_ok=True))


def test_cluster_bootstrap_resamples_prompts():
    from distalign.eval.stats import bootstrap_ci, cluster_bootstrap_ci

    # 20 prompts × 10 identical samples: the rows look like 200 draws, but only 20 are
    # independent, so the prompt-level interval is about √10 times wider
    values = [float(i % 2) for i in range(20) for _ in range(10)]
    groups = [str(i) for i in range(20) for _ in range(10)]
    lo, hi = cluster_bootstrap_ci(values, groups)
    rlo, rhi = bootstrap_ci(values)
    assert lo < 0.5 < hi and (hi - lo) / (rhi - rlo) == pytest.approx(10 ** 0.5, rel=0.2)


def test_bad_annotation_files(tmp_path):
    with pytest.raises(DataError, match="no such annotations file"):
        read_annotations(tmp_path / "missing.json")
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps([{"preference": 1.0}, {"output_1": "x"}]))
    with pytest.raises(DataError, match=r"a.json row 1: missing field 'preference'"):
        read_annotations(bad)
    bad.write_text(json.dumps([{"preference": "B"}]))
    with pytest.raises(DataError, match="row 0: field 'preference' is 'B'"):
        read_annotations(bad)
    bad.write_text("{oops")
    with pytest.raises(DataError, match="not a readable JSON"):
        read_annotations(bad)


def _files() -> dict[str, Path]:
    if not DATA.is_dir():
        pytest.skip(f"AlpacaEval annotations not present ({DATA} is absent)")
    return {p.name.removesuffix(".annotations.json.gz"): p for p in DATA.glob("*.json.gz")}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_reproduces_alpacaeval2_leaderboard(model):
    path = _files().get(model)
    if path is None:
        pytest.skip(f"{model}: annotation file absent")
    out = aggregate_annotations(read_annotations(path), str(path))
    win, se, discrete, n = PUBLISHED[model]
    m = out["metrics"]
    # the published CSV has 16-17 significant digits; summation order moves the last one
    assert m["eval/win_rate"] == pytest.approx(win, rel=1e-12)
    assert m["eval/win_rate_se"] == pytest.approx(se, rel=1e-12)
    assert m["eval/win_rate_discrete"] == pytest.approx(discrete, rel=1e-12)
    assert m["eval/n"] == n
    assert out["baseline"] == "gpt4_1106_preview" and out["generator"] == model


@pytest.mark.parametrize("model", UNPUBLISHED)
def test_unpublished_file_matches_pandas_rule(model):
    pd = pytest.importorskip("pandas")
    path = _files().get(model)
    if path is None:
        pytest.skip(f"{model}: annotation file absent")
    with gzip.open(path, "rt") as f:
        rows = json.load(f)
    # AlpacaEval's rule written with pandas, independently of distalign.eval.stats
    p = pd.Series([r["preference"] for r in rows], dtype=float).replace({0: 1.5})
    soft = p[(p >= 1) & (p <= 2)] - 1
    hard = p.replace({1.5: 0}).round().replace({0.0: 1.5})
    hard = hard[(hard >= 1) & (hard <= 2)] - 1
    m = aggregate_annotations(read_annotations(path))["metrics"]
    assert m["eval/win_rate"] == pytest.approx(soft.mean() * 100, rel=1e-12)
    assert m["eval/win_rate_se"] == pytest.approx(soft.sem() * 100, rel=1e-12)
    assert m["eval/win_rate_discrete"] == pytest.approx(hard.mean() * 100, rel=1e-12)


def test_cli_annotations_subprocess(tmp_path):
    """``distalign eval --annotations`` as a user runs it, output to a file; exit 2 on bad input."""
    path = _files().get("claude-2")
    if path is None:
        pytest.skip("claude-2 annotation file absent")
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        cmd = [sys.executable, "-m", "distalign", "eval", "--annotations", str(path),
               "--out", str(tmp_path / "ev")]
        rc = subprocess.run(cmd, stdout=f, stderr=f).returncode
    assert rc == 0, log.read_text()
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["metrics"]["eval/win_rate"] == pytest.approx(PUBLISHED["claude-2"][0], rel=1e-12)
    assert "17.19" in log.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    res = subprocess.run([sys.executable, "-m", "distalign", "eval", "--annotations", str(bad),
                          "--out", str(tmp_path / "ev2")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: ")
    assert "Traceback" not in res.stderr
