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
    files = {
        "bad_byte.jsonl": b'{"prompt": "a", "chosen": "b\xff", "rejected": "c"}\n',
        "torn.jsonl": b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "ch',
        "list.jsonl": b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n[1, 2]\n',
        "empty.jsonl": b"",
        "rows.txt": b"prompt chosen rejected\n",
        "no_rejected.jsonl": b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                             b'{"prompt": "a", "chosen": "b"}\n',
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)

    def data(name: str) -> list[str]:
        return ["train", "dpo", "--config", c, f"data.path={tmp_path / name}"]

    return {
        "non-utf8 byte": (data("bad_byte.jsonl"), "line 1: byte 0xff"),
        "truncated json line": (data("torn.jsonl"), "line 2: not valid JSON"),
        "non-object line": (data("list.jsonl"), "line 2: expected a JSON object"),
        "empty file": (data("empty.jsonl"), "the file is empty"),
        "unsupported extension": (data("rows.txt"), "unsupported file type"),
        "missing rejected": (data("no_rejected.jsonl"),
                             "row 2 (line 2): field 'rejected' is missing"),
        "lr nan": (["train", "dpo", "--config", c, "optim.lr=nan"], "optim.lr"),
        "log_every 0": (["train", "dpo", "--config", c, "run.log_every=0"], "run.log_every"),
        "unknown tracker": (["train", "dpo", "--config", c, "run.report_to=[x]"], "tracker"),
        "lora bias": (["train", "dpo", "--config", c, "model.lora.bias=maybe"], "lora.bias"),
        "no model dir": (["train", "dpo", "--config", c, f"model.name_or_path={tmp_path}/x/y"],
                         "no such directory"),
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
    "unknown option", "missing model", "non-utf8 byte", "truncated json line",
    "non-object line", "empty file", "unsupported extension", "missing rejected", "lr nan",
    "log_every 0", "unknown tracker", "lora bias", "no model dir",
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


def test_version_and_print_config_without_a_config(capsys):
    from distalign import __version__

    main(["--version"])  # returns normally: exit status 0
    assert capsys.readouterr().out.strip() == f"distalign {__version__}"
    main(["train", "rlhf", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["algo"]["clip_range"] == 0.2 and printed["model"]["name_or_path"] == ""


def test_overwrite_flag_replaces_a_finished_run(config_file, tmp_path, capsys):
    argv = ["train", "dpo", "--config", str(config_file), "run.max_steps=1"]
    main(argv)
    with pytest.raises(SystemExit) as info:
        main([*argv[:-1], "run.max_steps=2"])
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main([*argv[:-1], "run.max_steps=2", "--overwrite"])
    assert [r["step"] for r in read_metrics(tmp_path / "cli")] == [0, 1, 2]


def test_data_columns_map_other_column_names(config_file, tmp_path):
    rows = [{"question": p, "good": c, "bad": r} for p, c, r in
            [("the dog is", "a good dog", "bad"), ("you are good", "thank you", "you")] * 4]
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["train", "dpo", "--config", str(config_file), f"data.path={path}", "run.max_steps=1",
          "data.columns.prompt=question", "data.columns.chosen=good", "data.columns.rejected=bad",
          "run.name=cols"])
    summary = json.loads((tmp_path / "cols" / "summary.json").read_text())
    assert summary["data"]["train"]["rows_kept"] == 8


def test_online_progress_lines_show_phase_times_in_a_log_file(tiny, tmp_path):
    import os
    import subprocess
    import sys

    cfg = base_config(tiny, "rebel", tmp_path / "online")
    cfg["run"].update(max_steps=2, log_every=1)
    cfg["algo"] = {"update_epochs": 1}
    path = tmp_path / "rebel.yaml"
    path.write_text(yaml.safe_dump({"method": "rebel", **cfg}))
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "distalign", "train", "rebel", "--config",
                               str(path)], stdout=f, stderr=subprocess.STDOUT, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "rebel 2/2" in text and "time gen=" in text and "upd=" in text, text
    rows = read_metrics(tmp_path / "online")
    assert all(r["time/generate"] > 0 for r in rows[1:])


def test_bad_rows_stop_the_run_before_any_model_loads(config_file, tmp_path, monkeypatch,
                                                      capsys):
    """A bad row is reported in seconds: the data is read before the (slow) model load."""
    import distalign.train.setup as setup

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(setup, "load_policy", no_load)
    (tmp_path / "no_rejected.jsonl").write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(SystemExit) as info:
        main(["train", "dpo", "--config", str(config_file),
              f"data.path={tmp_path / 'no_rejected.jsonl'}"])
    assert info.value.code == 2
    assert "row 2 (line 2): field 'rejected' is missing" in capsys.readouterr().err
