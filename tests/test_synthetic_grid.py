"""`distalign synthetic` end to end on a miniature grid: both reward classes, the adaptive
rounds (β-grid extension, budget raises), selection, outputs, reuse, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distalign.pipeline.synthetic_grid import run_grid
from distalign.synthetic.adapt import selection_keys
from distalign.synthetic.config import Convergence, Stage, SyntheticConfig
from distalign.synthetic.experiment import cell_data, make_job, prepare_world, run_job
from distalign.synthetic.world import WorldConfig

TINY = SyntheticConfig(
    world=WorldConfig(prompt_len=1, num_content=2, max_len=2),
    methods=("pmle", "rlhf"),
    sizes=(64, 128),
    seeds=(0,),
    online_min_n=0,
    sft_samples=256,
    sft=Stage(run={"batch_size": 64, "epochs": 1}, optim={"lr": 3e-3}),
    reward=Stage(run={"batch_size": 32, "epochs": 1}, optim={"lr": 1e-3}),
    light_reward=Stage(run={"batch_size": 32, "epochs": 2}, optim={"lr": 0.1}),
    offline=Stage(run={"batch_size": 32, "epochs": 1}, optim={"lr": 1e-3}),
    online=Stage(run={"batch_size": 16, "max_steps": 10}, optim={"lr": 1e-3},
                 algo={"update_epochs": 1, "missing_eos_penalty": 10.0}),
    # two points: whichever is chosen lies on an edge, so each group is extended once
    grids={"pmle": [{"beta": 0.0}, {"beta": 1.0}], "rlhf": [{"beta": 1.0}, {"beta": 4.0}]},
    eval_points=2,
    # a tolerance no 10-step run meets: every on-policy run gets its one raise
    convergence=Convergence(window=2, tol=1e-9, max_raises=1),
    max_extensions=1,
    slope_points=2,
    bootstrap=50,
    workers=1,
)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    """The miniature grid, run once for the module: (output directory, results, log lines)."""
    out = tmp_path_factory.mktemp("grid")
    logs: list[str] = []
    return out, run_grid(TINY, out, log=logs.append), logs


def test_miniature_grid_adapts_writes_results_and_reuses_finished_runs(grid):
    tmp_path, res, logs = grid
    runs = res["runs"]
    assert {r["variant"] for r in runs} == {"offline", "standard", "light"}
    for r in runs:
        assert (Path(r["run_dir"]) / "summary.json").exists()
    # the light reward model is the linear class and reports its exact rm_kl_fwd
    light_rm = [r for r in runs if r["method"] == "reward" and r["variant"] == "light"]
    assert len(light_rm) == 2 and all(0 <= r["metrics"]["rm_kl_fwd"] < 1 for r in light_rm)
    cfg = json.loads((tmp_path / "runs/n64-s0/light/reward/final/config.json").read_text())
    assert cfg["model_type"] == "distalign_light_reward"
    # every rlhf group was extended past the edge its choice sat on: a third β, trained
    ext = [e for e in res["events"] if e["what"] == "grid extended" and e["method"] == "rlhf"]
    assert {(e["variant"], e["n"]) for e in ext} == {(v, n) for v in ("standard", "light")
                                                      for n in (64, 128)}
    for e in ext:
        beta = e["params"]["beta"]
        assert beta in (0.25, 16.0)
        cell = tmp_path / "runs" / f"n{e['n']}-s0" / ("light" if e["variant"] == "light" else "")
        assert (cell / f"rlhf-beta{beta:g}" / "summary.json").exists()
    # budget raises: the run continued from its checkpoint to twice the steps, its curve
    # spans both parts, and "not converged" stays reported
    raised = [r for r in runs if r["method"] == "rlhf" and r["level"] == 1]
    assert raised
    for r in raised:
        assert json.loads((Path(r["run_dir"]) / "summary.json").read_text())["step"] == 20
        assert (Path(r["run_dir"]) / "checkpoints" / "step-10").is_dir()
    assert len(raised[0]["obj_curve"]) >= 3
    assert res["convergence"]["not_converged"] > 0
    table = res["methods"]["light"]["rlhf"]["by_n"]["128"]
    assert table["leak_aware_seeds"]["0"]["converged"] is False
    # the selection rules on the final grid
    for variant in ("standard", "light"):
        for n, cell in res["methods"][variant]["rlhf"]["by_n"].items():
            finals = [r for r in runs if r["variant"] == variant and r["method"] == "rlhf"
                      and r["n"] == int(n) and r["level"] == 1]
            best = max(finals, key=lambda r: selection_keys(r["metrics"])["leak_aware"])
            assert cell["leak_aware_params"] == [best["params"]]
            orc = min(finals, key=lambda r: r["metrics"]["kl_fwd"])
            assert cell["oracle"]["kl_fwd"]["mean"] == pytest.approx(orc["metrics"]["kl_fwd"])
    # outputs
    saved = json.loads((tmp_path / "synthetic_results.json").read_text())
    assert set(saved["methods"]) == {"standard", "light"}
    assert set(saved["methods"]["light"]) == {"pmle", "rlhf"}
    claims = (tmp_path / "claims.md").read_text()
    assert "| consistent at O(1/n) | either (no R̂) | pmle |" in claims and "Rules" in claims
    # non-converged RLHF runs are no evidence: its floor claim is inconclusive
    assert "| RLHF stays above its floor | light | rlhf |" in claims
    row = next(c for c in saved["claims"] if c["claim"] == "RLHF stays above its floor")
    assert row["verdict"] == "inconclusive"
    for png in ("synthetic_kl.png", "synthetic_winrate.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert any(line.startswith("elapsed: ") for line in logs)
    # a second call reuses every finished run and repeats the same adaptations
    logs.clear()
    again = run_grid(TINY, tmp_path, log=logs.append)
    assert all(r["seconds"] == 0.0 for r in again["runs"])
    assert len(again["runs"]) == len(runs)
    assert json.dumps(again["methods"]) == json.dumps(res["methods"])


def test_run_job_reuses_a_finished_run_and_overwrite_trains_it_again(grid):
    """run_job reads a finished run through distalign.train.rundir; --overwrite retrains it
    (the engine alone would keep a run finished with this very config) without leaving
    ``run.overwrite`` in its config.yaml, so a later plain call reuses it again."""
    out, res, _ = grid
    setup = prepare_world(TINY, out, log=lambda _: None)
    cells = cell_data(TINY, setup["world"], setup["logp_ref"], out, seed=0)
    old = next(r for r in res["runs"]
               if r["method"] == "pmle" and r["n"] == 64 and r["params"] == {"beta": 1.0})
    job = make_job(TINY, setup, cells[(64, 0)], ("offline", "pmle", 64, 0), old["params"], 0,
                   out)
    again = run_job(job)
    assert again["reused"] and again["seconds"] == 0.0
    assert again["metrics"] == pytest.approx(old["metrics"], rel=1e-12)
    summary = Path(again["run_dir"]) / "summary.json"
    before = summary.stat().st_mtime_ns
    fresh = run_job({**job, "overwrite": True})
    assert not fresh["reused"] and summary.stat().st_mtime_ns > before
    # same seed, data and config on CPU: the retrained run reproduces the first one
    assert fresh["metrics"]["kl_fwd"] == pytest.approx(old["metrics"]["kl_fwd"], rel=1e-6)
    assert "overwrite: true" not in (summary.parent / "config.yaml").read_text()
    assert run_job(job)["reused"]


def test_cli_rejects_bad_arguments(tmp_path):
    from distalign.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["synthetic", "--methods", "ppo", "--out", "unused"])
    assert exc.value.code == 2
    # as a subprocess with output to a file: one line, exit 2, no traceback
    log = tmp_path / "log.txt"
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-m", "distalign", "synthetic", "--reward-class",
                               "heavy", "--out", str(tmp_path / "x")], stdout=fh, stderr=fh)
    text = log.read_text()
    assert proc.returncode == 2 and "Traceback" not in text
    assert "error: --reward-class must be one of standard, light, both" in text
    with pytest.raises(SystemExit) as exc:
        main(["synthetic", "--sizes", "1k"])
    assert exc.value.code == 2
