"""The ``oracle`` judge of the synthetic world: the exact preference model of eq. (3).

P(a ≻ b | x) = σ(γ · ln π*(a|x)/π*(b|x)), with π* the world's known target. Strings outside
the response space 𝒜 have π* = 0, so (as in ``distalign.synthetic.metrics``) a valid response
beats an invalid one with probability 1 and two invalid ones tie at ½. ``oracle`` uses the
default world; ``oracle:PATH`` reads a ``world.json`` (as written next to a synthetic grid).
Eval finds it through the ``distalign.oracles`` entry point ``synthetic`` (:func:`oracle_judge`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distalign.errors import ConfigError, DataError
from distalign.eval.judges.base import Pair, Verdict
from distalign.eval.judges.reward import sigmoid
from distalign.synthetic.world import World, build_world


class OracleJudge:
    template_id = None

    def __init__(self, world_path: str | None = None) -> None:
        if world_path is None:
            self.world = build_world()
            self.id = "oracle"
        else:
            path = Path(world_path)
            if path.is_dir():
                path = path / "world.json"
            if not path.is_file():
                raise ConfigError(f"--judge oracle:{world_path}: no world.json there")
            self.world = World.load(path)
            self.id = f"oracle:{path}"
        self.logp_star = self.world.logp_star()
        self.prompt_index = {p: i for i, p in enumerate(self.world.prompts)}
        self.calls = 0

    def logp(self, prompt: str, response: str) -> float:
        """ln π*(response | prompt); −∞ outside 𝒜."""
        x = self.prompt_index.get(" ".join(prompt.split()))
        if x is None:
            raise DataError(f"oracle: prompt {prompt!r} is not a prompt of this synthetic world")
        a = self.world._index().get(" ".join(response.split()))
        return -math.inf if a is None else float(self.logp_star[x, a])

    def prob(self, prompt: str, a: str, b: str) -> float:
        la, lb = self.logp(prompt, a), self.logp(prompt, b)
        if la == lb == -math.inf:
            return 0.5
        if lb == -math.inf or la == -math.inf:
            return 1.0 if lb == -math.inf else 0.0
        return sigmoid(self.world.gamma * (la - lb))

    def judge(self, pairs: Sequence[Pair], progress: bool = True) -> list[Verdict]:
        self.calls += len(pairs)
        return [Verdict(self.prob(p.prompt, p.output, p.reference)) for p in pairs]


def oracle_judge(world_path: str | None, **kwargs: Any) -> OracleJudge:
    """Entry point ``distalign.oracles: synthetic`` (eval's other keyword arguments, such as
    its cache, do not concern an exact judge)."""
    return OracleJudge(world_path)
