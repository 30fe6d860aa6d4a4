"""`distalign toy` end to end: outputs on disk, one-line errors with exit status 2."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
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
        (["--threads", "0"], "--threads"),
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


def _one_line_error(capsys, words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err, err


TINY = ["--seeds", "1", "--ns", "16", "--methods", "rlhf", "--contexts", "2", "--responses", "3"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--ns", "16,64,16"], "--ns lists n = 16 twice"),
        (["--methods", "rlhf,rkl,rlhf"], "--methods lists 'rlhf' twice"),
        (["--plot", "figure.xyz"], "matplotlib cannot write .xyz"),
        (["--plot", "figure"], "--plot figure: give a file name with a suffix"),
    ],
)
def test_bad_output_flags_exit_2_before_anything_is_written(
    tmp_path: Path, capsys, flags: list[str], words: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["toy", *TINY, "--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2
    _one_line_error(capsys, words)
    assert not (tmp_path / "x").exists()


def test_out_that_is_a_file(tmp_path: Path, capsys) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main(["toy", *TINY, "-o", str(target)])
    assert exc.value.code == 2
    _one_line_error(capsys, "is a file, not a directory")
    assert target.read_text() == "keep me"


def test_out_below_a_file_cannot_be_created(tmp_path: Path, capsys) -> None:
    (tmp_path / "plain").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["toy", *TINY, "--out", str(tmp_path / "plain" / "run")])
    assert exc.value.code == 2
    _one_line_error(capsys, "cannot write there")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_out(tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["toy", *TINY, "--out", str(ro)])
    finally:
        ro.chmod(0o700)
    assert exc.value.code == 2
    _one_line_error(capsys, "cannot write there")


def test_plot_in_a_missing_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["toy", *TINY, "--out", str(tmp_path / "run"), "--plot", "no/such/fig.png"])
    assert exc.value.code == 2
    _one_line_error(capsys, "does not exist")
    assert not (tmp_path / "run" / "results.json").exists()


def test_plot_path_is_taken_as_given_and_its_suffix_picks_the_format(
        tmp_path: Path, monkeypatch) -> None:
    """--plot fig.svg lands in the working directory, like any path argument, not in --out."""
    monkeypatch.chdir(tmp_path)
    main(["toy", *TINY, "--out", str(tmp_path / "run"), "--plot", "fig.svg"])
    assert (tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")
    assert not (tmp_path / "run" / "fig.svg").exists()
    assert not (tmp_path / "run" / "figure1.png").exists()
    timings = json.loads((tmp_path / "run" / "results.json").read_text())["timings"]
    assert set(timings) >= {"newton", "selection", "io_plot"}
    main(["toy", *TINY, "--out", str(tmp_path / "run2")])  # no --plot: figure1.png in --out
    assert (tmp_path / "run2" / "figure1.png").is_file()


def test_a_custom_grid_never_replaces_the_presets_results(tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "runs" / "toy-paper"
    preset.mkdir(parents=True)
    (preset / "results.json").write_text("the preset's")
    main(["toy", "--seeds", "2", "--ns", "16,64", "--methods", "rlhf", "--contexts", "2",
          "--responses", "3"])
    assert (preset / "results.json").read_text() == "the preset's"
    custom = tmp_path / "runs" / "toy-paper-X2-K3-n16-64-seeds2-rlhf"
    assert json.loads((custom / "results.json").read_text())["config"]["seeds"] == 2
    assert str(Path("runs") / custom.name) in capsys.readouterr().out


def test_one_seed_prints_no_interval_and_one_size_no_slope(tmp_path: Path, capsys) -> None:
    main(["toy", *TINY, "--out", str(tmp_path)])  # TINY: one seed, one size n
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # rich wraps long titles at the console's width
    assert "one seed: no interval" in flat and "95% CI" not in flat
    assert not re.search(r"│ 16 │ [0-9.e-]+ \[", flat)  # the cell is the mean alone
    assert "nan" not in out and re.search(r"slope 16–16 │ +– │", out)
    assert "note: slope – : the log-log slope needs at least two sizes n" in flat


def _cli(args: list[str], log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as fh:
        return subprocess.run([sys.executable, "-m", "distalign", *args], stdout=fh,
                              stderr=subprocess.PIPE, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_as_a_process_with_output_to_a_file(tmp_path: Path) -> None:
    """As in a batch job: progress as plain lines, the tables, exit 0; a bad flag exits 2."""
    log = tmp_path / "log.txt"
    proc = _cli(["toy", "--seeds", "2", "--ns", "16,64", "--methods", "rlhf,pmle",
                 "--contexts", "2", "--responses", "3", "--out", str(tmp_path / "run")], log)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert "toy 2/4" in text and "toy 4/4" in text  # one progress line per method
    assert "results.json" in text and (tmp_path / "run" / "figure1.png").exists()
    proc = _cli(["toy", "--ns", "8,8", "--out", str(tmp_path / "bad")], log)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --ns lists n = 8 twice; give each sample size once"
    assert "Traceback" not in log.read_text() + proc.stderr
