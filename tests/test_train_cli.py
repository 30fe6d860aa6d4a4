"""``distalign train``: a real run from a YAML file plus overrides, and one-line errors (exit 2,
no traceback) for every kind of bad input."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import base_config, read_metrics

from distalign.cli import main


@pytest.fixture
def config_file(tiny, tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"method": "dpo", **base_config(tiny, "dpo", tmp_path / "cli")}))
    return path


def test_train_runs_from_yaml_with_overrides(config_file, tmp_path, capsys):
    main(["train", "dpo", "--config", str(config_file), "run.max_steps=1", "algo.gamma=0.2",
          "run.name=over"])
    run_dir = tmp_path / "over"  # run.name override applied
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["algo"]["gamma"] == 0.2 and saved["run"]["max_steps"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 1
    assert (run_dir / "final" / "config.json").exists()


def test_print_config_shows_the_resolved_config(config_file, capsys):
    main(["train", "dpo", "--config", str(config_file), "--print-config", "algo.gamma=0.3"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "dpo" and printed["algo"]["gamma"] == 0.3


def _bad(tmp_path, config_file):
    other = tmp_path / "other.yaml"
    other.write_text("method: pmle\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: {max_steps: [1\n")
    unknown_in_file = tmp_path / "unknown.yaml"
    unknown_in_file.write_text(config_file.read_text() + "bogus_section: {a: 1}\n")
    c = str(config_file)
    return {
        "unknown method": (["train", "nope", "--config", c], "unknown method 'nope'"),
        "unknown key": (["train", "dpo", "--config", c, "run.bogus=1"], "'run.bogus'"),
        "unknown algo key": (["train", "dpo", "--config", c, "algo.eta=1"], "algo.eta"),
        "ill-typed": (["train", "dpo", "--config", c, "run.batch_size=abc"], "run.batch_size"),
        "missing file": (
            ["train", "dpo", "--config", str(tmp_path / "no.yaml")], "no.yaml",
        ),
        "no '='": (["train", "dpo", "--config", c, "run.max_steps"], "key=value"),
        "file for another method": (["train", "dpo", "--config", str(other)], "method 'pmle'"),
        "broken yaml": (["train", "dpo", "--config", str(broken)], "cannot parse"),
        "unknown key in file": (["train", "dpo", "--config", str(unknown_in_file)], "bogus"),
        "invalid value": (["train", "dpo", "--config", c, "run.max_steps=0"], "max_steps"),
        "unknown option": (["train", "dpo", "--bogus"], "bogus"),
        "missing model": (["train", "dpo", f"data.path={c}"], "model.name_or_path"),
    }


CASES = [
    "unknown method", "unknown key", "unknown algo key", "ill-typed", "missing file", "no '='",
    "file for another method", "broken yaml", "unknown key in file", "invalid value",
    "unknown option", "missing model",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_exit_2(case, config_file, tmp_path, capsys):
    argv, needle = _bad(tmp_path, config_file)[case]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err
