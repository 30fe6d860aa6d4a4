"""Gold rewards r(x, y) of the tilted world: real, cheap and **bounded**.

The bound is what makes the world measurable: importance weights exp(r/β*) are bounded, and
accepting y ~ π₀ with probability exp((r − r_max)/β*) gives exact draws of π*. So a gold
reward without a stated bound is refused. Specs:

- ``vader``: VADER's compound sentiment of the reply, in [−1, 1] (vaderSentiment; ~55 µs a
  call). The prompt is not read: the world tilts π₀ towards positive replies.
- ``reward:DIR``: a trained reward model (``distalign train reward``) on the exact token ids;
  a reward model has no bound of its own, so the spec needs ``bounds`` and the gold reward is
  R̂ clipped into them (clipped rows are counted in ``clipped``).
- ``MODULE:FUNCTION``: ``FUNCTION(prompt: str, reply: str) -> float``, with its bound as an
  attribute ``FUNCTION.bounds = (lo, hi)`` or given as ``bounds``; a value outside the bound
  is an error (the function broke its own promise).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, Protocol

from distalign.errors import ConfigError, DataError


class GoldReward(Protocol):
    spec: str
    bounds: tuple[float, float]

    def score(self, prompts: Sequence[str], replies: Sequence[str],
              prompt_ids: Sequence[Sequence[int]], reply_ids: Sequence[Sequence[int]]
              ) -> list[float]: ...

    def describe(self) -> dict[str, Any]: ...


def _bounds(value: Any, spec: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"gold reward {spec!r}: bounds {value!r} are not two numbers "
                          "(lo, hi)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"gold reward {spec!r}: bounds ({lo}, {hi}) must be finite with lo < hi")
    return lo, hi


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class VaderReward:
    """VADER compound sentiment of the reply text, in [−1, 1]."""

    spec = "vader"
    bounds = (-1.0, 1.0)

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ConfigError("gold reward 'vader' needs vaderSentiment (pip install "
                              "'distalign[real]')") from None
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], replies: Sequence[str],
              prompt_ids: Sequence[Sequence[int]] = (), reply_ids: Sequence[Sequence[int]] = ()
              ) -> list[float]:
        return [float(self._analyzer.polarity_scores(t)["compound"]) for t in replies]

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "bounds": list(self.bounds),
                "version": _version("vaderSentiment")}


class FunctionReward:
    """``MODULE:FUNCTION(prompt, reply) -> float`` with a stated bound."""

    def __init__(self, spec: str, fn: Callable[[str, str], float],
                 bounds: tuple[float, float]) -> None:
        self.spec, self.fn, self.bounds = spec, fn, bounds

    def score(self, prompts: Sequence[str], replies: Sequence[str],
              prompt_ids: Sequence[Sequence[int]] = (), reply_ids: Sequence[Sequence[int]] = ()
              ) -> list[float]:
        lo, hi = self.bounds
        out = [float(self.fn(p, y)) for p, y in zip(prompts, replies, strict=True)]
        bad = next((i for i, v in enumerate(out) if not lo <= v <= hi), None)
        if bad is not None:
            raise DataError(f"gold reward {self.spec}: {out[bad]} for reply {bad} is outside its "
                            f"stated bounds [{lo}, {hi}]")
        return out

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "bounds": list(self.bounds)}


class RewardModelGold:
    """A trained reward model, clipped into the stated bounds."""

    def __init__(self, spec: str, path: str, bounds: tuple[float, float],
                 batch_size: int = 16) -> None:
        from distalign.eval.judges.reward import load_scorer_dir, model_fingerprint

        self.spec, self.path, self.bounds, self.batch_size = spec, path, bounds, batch_size
        self.model, self.tok = load_scorer_dir(path)
        self.fingerprint = model_fingerprint(path)
        self.clipped = 0

    def score(self, prompts: Sequence[str], replies: Sequence[str],
              prompt_ids: Sequence[Sequence[int]] = (), reply_ids: Sequence[Sequence[int]] = ()
              ) -> list[float]:
        from distalign.eval.judges.reward import score_sequences

        if len(reply_ids) != len(replies):
            raise DataError(f"gold reward {self.spec} scores token ids; none were given")
        raw = score_sequences(self.model, list(zip(prompt_ids, reply_ids, strict=True)),
                              self.tok.pad_token_id, self.batch_size)
        lo, hi = self.bounds
        self.clipped += sum(not lo <= v <= hi for v in raw)
        return [min(max(v, lo), hi) for v in raw]

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "bounds": list(self.bounds), "fingerprint": self.fingerprint}


def check_gold_spec(spec: str, bounds: Sequence[float] | None = None) -> tuple[float, float]:
    """The bound of a gold reward spec, without loading anything heavy (a reward model): the
    one-line refusals of an unknown spec or a missing bound come before any sampling."""
    kind, sep, arg = spec.partition(":")
    if spec == "vader":
        if bounds is not None and _bounds(bounds, spec) != VaderReward.bounds:
            raise ConfigError("gold reward 'vader' is bounded by [-1, 1]; drop the bounds")
        return VaderReward.bounds
    if not sep or not arg or not kind:
        raise ConfigError(f"unknown gold reward {spec!r}: expected vader, reward:DIR or "
                          "MODULE:FUNCTION")
    if kind == "reward":
        if bounds is None:
            raise ConfigError(f"gold reward {spec!r} has no stated bound: a reward model is "
                              "unbounded; give bounds LO,HI (it is clipped into them)")
        return _bounds(bounds, spec)
    fn = _function(spec, kind, arg)
    own = getattr(fn, "bounds", None)
    if bounds is None and own is None:
        raise ConfigError(f"gold reward {spec!r} has no stated bound: give {arg}.bounds = "
                          "(lo, hi) in its module, or bounds LO,HI in the spec")
    return _bounds(bounds if bounds is not None else own, spec)


def _function(spec: str, module: str, name: str) -> Callable[[str, str], float]:
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"unknown gold reward {spec!r}: cannot import {module!r} "
                          f"({err})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ConfigError(f"unknown gold reward {spec!r}: {module} has no function {name!r}")
    return fn


def make_gold_reward(spec: str, bounds: Sequence[float] | None = None,
                     batch_size: int = 16) -> GoldReward:
    """The gold reward named by ``spec`` (see the module docstring)."""
    lo_hi = check_gold_spec(spec, bounds)
    if spec == "vader":
        return VaderReward()
    kind, _, arg = spec.partition(":")
    if kind == "reward":
        return RewardModelGold(spec, arg, lo_hi, batch_size)
    return FunctionReward(spec, _function(spec, kind, arg), lo_hi)
