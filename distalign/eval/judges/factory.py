"""``make_judge(spec)``: the judge a ``--judge`` spec names (see :mod:`.base` for the specs).

Kept apart from :mod:`.base` so that the judges import the protocol and the factory imports
the judges, never the other way round.
"""

from __future__ import annotations

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
        from distalign.eval.judges.oracle import OracleJudge

        return OracleJudge(arg or None)
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
