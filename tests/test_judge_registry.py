"""Oracle judges are found through the ``distalign.oracles`` entry points by the kind a
``world.json`` declares, so eval imports no world and a fresh process finds them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distalign.errors import ConfigError
from distalign.eval.judges.factory import make_judge, world_kind


def test_worlds_register_their_oracles_by_kind(tmp_path):
    from importlib.metadata import entry_points

    assert {"synthetic", "tilted"} <= {ep.name for ep in entry_points(group="distalign.oracles")}
    assert world_kind(None) == "synthetic"
    old = tmp_path / "old" / "world.json"  # written before worlds declared a kind
    old.parent.mkdir()
    old.write_text(json.dumps({"world": {}}))
    assert world_kind(str(old.parent)) == "synthetic"


def test_an_unknown_world_kind_is_one_line(tmp_path):
    path = tmp_path / "world.json"
    path.write_text(json.dumps({"kind": "moon"}))
    with pytest.raises(ConfigError, match="no oracle registered for worlds of kind 'moon'"):
        make_judge(f"oracle:{path}")
    with pytest.raises(ConfigError, match="no world.json there"):
        make_judge(f"oracle:{tmp_path / 'nowhere'}")


def test_a_fresh_process_finds_the_synthetic_oracle_and_eval_imports_no_world():
    code = ("import sys\nfrom distalign.eval.judges import make_judge\n"
            "before = {m for m in sys.modules if m.startswith(('distalign.synthetic', "
            "'distalign.tilted'))}\n"
            "j = make_judge('oracle')\n"
            "print(sorted(before), type(j).__module__, round(j.prob(j.world.prompts[0], "
            "j.world.responses[0], j.world.responses[0]), 6))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["[]", "distalign.synthetic.oracle", "0.5"]


def test_every_comma_separated_option_parses_in_one_place():
    from distalign.cli._app import comma_list

    assert comma_list(" a, b,,c ", "--x") == ["a", "b", "c"]
    assert comma_list("", "--x") is None and comma_list(None, "--x") is None
    assert comma_list("1,2", "--n", int) == [1, 2]
    with pytest.raises(ConfigError, match=r"^--n must be comma-separated integers, got '1,x'$"):
        comma_list("1,x", "--n", int)
    with pytest.raises(ConfigError, match=r"^--l must be values >= 1, got '0,2'$"):
        comma_list("0,2", "--l", int, minimum=1)
