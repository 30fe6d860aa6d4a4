"""``make_judge(spec)``: the judge a ``--judge`` spec names (see :mod:`.base` for the specs).

Kept apart from :mod:`.base` so that the judges import the protocol and the factory imports
the judges, never the other way round. Oracle judges belong to the worlds that know π*: each
world registers one under the entry-point group ``distalign.oracles`` (named by the ``kind``
in its ``world.json``), so eval finds them in any process without importing a world.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from distalign.errors import ConfigError
from distalign.eval.judges.base import Judge, load_template


def make_judge(
    spec: str,
    *,
    judge_url: str | None = None,
    template: str | None = None,
    batch_size: int = 16,
    cache: Any = None,
    policy_tokenizer: Any = None,
    **kwargs: Any,
) -> Judge:
    """The judge named by ``spec`` (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "oracle":
        return oracle_judge(arg or None, cache=cache, policy_tokenizer=policy_tokenizer,
                            batch_size=batch_size, **kwargs)
    if not arg:
        raise ConfigError(f"--judge {spec!r}: expected reward:DIR, hf:DIR, openai:MODEL or oracle")
    if kind == "reward":
        from distalign.eval.judges.reward import RewardJudge

        return RewardJudge(arg, batch_size=batch_size, policy_tokenizer=policy_tokenizer,
                           cache=cache)
    if kind == "hf":
        from distalign.eval.judges.hf import HFJudge

        path, _, gguf = arg.partition("@")
        return HFJudge(path, gguf or None, load_template(template), cache=cache,
                       batch_size=batch_size)
    if kind == "openai":
        from distalign.eval.judges.openai import OpenAIJudge

        if not judge_url:
            raise ConfigError(f"--judge {spec}: needs --judge-url (an OpenAI-compatible server)")
        return OpenAIJudge(arg, judge_url, load_template(template), cache=cache, **kwargs)
    raise ConfigError(f"--judge {spec!r}: unknown kind {kind!r} (reward, hf, openai, oracle)")


ORACLES = "distalign.oracles"


def world_kind(world_path: str | None) -> str:
    """The ``kind`` a ``world.json`` declares (files from before kinds existed: synthetic)."""
    if world_path is None:
        return "synthetic"  # the default world of `--judge oracle`
    path = Path(world_path)
    path = path / "world.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--judge oracle:{world_path}: no world.json there") from exc
    except ValueError as exc:
        raise ConfigError(f"--judge oracle:{world_path}: not a world.json ({exc})") from exc
    return str(data.get("kind", "synthetic")) if isinstance(data, dict) else "synthetic"


def oracle_judge(world_path: str | None, **kwargs: Any) -> Judge:
    """The oracle judge of the world at ``world_path``, from its kind's registered factory."""
    kind = world_kind(world_path)
    found = {ep.name: ep for ep in entry_points(group=ORACLES)}
    if kind not in found:
        raise ConfigError(f"--judge oracle:{world_path}: no oracle registered for worlds of kind "
                          f"{kind!r} (registered: {', '.join(sorted(found)) or 'none'}; is "
                          "distalign installed with `pip install -e .`?)")
    return found[kind].load()(world_path, **kwargs)
