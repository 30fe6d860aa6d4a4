"""`distalign synthetic` end to end on a miniature grid: runs, selection, outputs, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distalign.synthetic.config import Stage, SyntheticConfig
from distalign.synthetic.experiment import run_grid
from distalign.synthetic.results import select
from distalign.synthetic.world import WorldConfig

TINY = SyntheticConfig(
    world=WorldConfig(prompt_len=1, num_content=2, max_len=2),
    methods=("pmle", "rkl"),
    sizes=(64, 128),
    seeds=(0,),
    sft_samples=256,
    sft=Stage(run={"batch_size": 64, "epochs": 1}, optim={"lr": 3e-3}),
    reward=Stage(run={"batch_size": 32, "epochs": 1}, optim={"lr": 1e-3}),
    offline=Stage(run={"batch_size": 32, "epochs": 1}, optim={"lr": 1e-3}),
    online=Stage(run={"batch_size": 16, "max_steps": 2}, optim={"lr": 1e-3},
                 algo={"update_epochs": 1, "missing_eos_penalty": 10.0}),
    grids={"pmle": [{"beta": 0.0}, {"beta": 1.0}], "rkl": [{"beta": 0.0}]},
    eval_points=1,
    workers=1,
)


def test_miniature_grid_writes_results_and_reuses_finished_runs(tmp_path):
    logs: list[str] = []
    res = run_grid(TINY, tmp_path, log=logs.append)
    # 2 sizes × (reward + 2 pmle + 1 rkl) engine runs, each with a run directory
    assert len(res["runs"]) == 8
    for r in res["runs"]:
        assert (Path(r["run_dir"]) / "summary.json").exists()
        assert "val_pref_loglik" in r["metrics"]
    chosen = select(res["runs"])
    for key, c in chosen.items():
        vals = [g["metrics"]["val_pref_loglik"] for g in c["grid"]]
        kls = [g["metrics"]["kl_fwd"] for g in c["grid"]]
        assert c["selected"]["metrics"]["val_pref_loglik"] == max(vals), key
        assert c["oracle"]["metrics"]["kl_fwd"] == min(kls), key
    saved = json.loads((tmp_path / "synthetic_results.json").read_text())
    assert set(saved["methods"]) == {"pmle", "rkl"}
    assert set(saved["methods"]["pmle"]["by_n"]) == {"64", "128"}
    assert saved["reference"]["pi0"]["kl_ref"] == pytest.approx(0, abs=1e-9)
    table = (tmp_path / "synthetic_table.md").read_text()
    assert "| PMLE |" in table and "| Reverse KL |" in table
    for png in ("synthetic_kl.png", "synthetic_winrate.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # the engine's run directories are what `report` reads
    assert (tmp_path / "runs" / "n128-s0" / "pmle-beta1" / "config.yaml").exists()
    # a second call reuses every finished run instead of training again
    again = run_grid(TINY, tmp_path, log=logs.append)
    assert all(r["seconds"] == 0.0 for r in again["runs"])
    assert sum("reused" in line for line in logs) == 8
    # the grid is scheduled by the pipeline runner: each run has its done marker, and a run
    # without one (killed before it finished) is the only one trained again
    markers = sorted((tmp_path / "runs").glob("*/*/.done.train.json"))
    assert len(markers) == 8
    target = tmp_path / "runs" / "n64-s0" / "pmle-beta0"
    (target / ".done.train.json").unlink()
    (target / "summary.json").unlink()
    third = run_grid(TINY, tmp_path, log=logs.append)
    trained = [r for r in third["runs"] if r["seconds"] > 0]
    assert [Path(r["run_dir"]) for r in trained] == [target]
    by_dir = {r["run_dir"]: r["metrics"] for r in res["runs"]}
    assert trained[0]["metrics"] == pytest.approx(by_dir[str(target)], rel=1e-5)


def test_cli_rejects_bad_arguments(capsys):
    from distalign.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["synthetic", "--methods", "ppo", "--out", "unused"])
    assert exc.value.code == 2
    assert "unknown method(s) ['ppo']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["synthetic", "--sizes", "1k"])
    assert "--sizes must be comma-separated integers" in capsys.readouterr().err
