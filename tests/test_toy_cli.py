"""`distalign toy` end to end: outputs on disk, one-line errors with exit status 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from distalign.cli import main


def test_tiny_run_writes_json_csv_and_figure(tmp_path: Path, capsys) -> None:
    out = tmp_path / "toy"
    main(["toy", "--preset", "strong", "--seeds", "2", "--ns", "16,64",
          "--methods", "rlhf,rkl,dpo", "--contexts", "3", "--responses", "4", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["logit_scale"] == 1.0 and data["config"]["contexts"] == 3
    assert len(data["records"]) == 3 * 2 * 2  # method × n × seed
    rec = data["records"][0]
    for key in ("beta_oracle", "beta_honest", "fkl_oracle", "rkl_oracle", "kl_ref_oracle",
                "fkl_honest", "rkl_honest", "kl_ref_honest"):
        assert key in rec
    assert set(data["slopes"]) >= {"rlhf", "rkl", "dpo"}
    # the oracle β is by definition no worse than the honest one on the true forward KL
    assert all(r["fkl_oracle"] <= r["fkl_honest"] + 1e-12 for r in data["records"])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 12 and float(rows[0]["fkl_oracle"]) >= 0
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "results.json" in printed and "figure1.png" in printed


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--ns", "0,16"], "n must be"),
        (["--responses", "1"], "--responses"),
        (["--gamma", "0"], "--gamma"),
        (["--methods", "rlhf,ppo"], "unknown method"),
        (["--seeds", "0"], "--seeds"),
        (["--preset", "huge"], "unknown preset"),
        (["--ns", "a,b"], "--ns"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, capsys, flags: list[str],
                                         words: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["toy", "--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err
    assert not (tmp_path / "x").exists()
