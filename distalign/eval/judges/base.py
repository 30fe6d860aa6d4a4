"""Judges: the protocol, pairwise templates, both-order judging with a cache, and spec parsing.

A judge estimates P(output ≻ reference | prompt) for each :class:`Pair` (the win-probability of
the paper's preference model, eq. (3), as seen by the judge). Specs (``--judge``):

- ``reward:DIR``: σ(R̂(a) − R̂(ref)) under a trained reward model (:mod:`.reward`);
- ``hf:DIR`` or ``hf:DIR@FILE.gguf``: a local causal LM reading P("A") vs P("B") (:mod:`.hf`);
- ``openai:MODEL`` with ``judge_url``: any OpenAI-compatible server (:mod:`.openai`);
- ``oracle`` or ``oracle:WORLD.json``: a world's exact π* (the synthetic world by default;
  each world registers its oracle, see :mod:`.factory`).

LLM judges see a pair in **both orders** (output as A, then as B): position bias cancels in the
average, and the flip rate (the verdict changes with the order) measures it. Single-order
answers are cached on disk (:mod:`.cache`), so a rerun asks the judge nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from distalign.errors import ConfigError, DataError

TEMPLATES = Path(__file__).parent / "templates"
# share of single-order answers that may be unparseable before the evaluation stops
MAX_UNPARSED = 0.5


@dataclass
class Pair:
    """One comparison: the evaluated ``output`` against the ``reference`` for ``prompt``.

    ``prompt_ids``/``output_ids`` are the exact token ids of the generations file (the reward
    judge scores them without re-tokenising)."""

    prompt: str
    output: str
    reference: str
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)


@dataclass
class Verdict:
    """P(output ≻ reference) (None: no parseable answer in either order) and, for two-order
    judges, each order's value (``p_first``: output shown as A; ``p_second``: output as B)."""

    p: float | None
    p_first: float | None = None
    p_second: float | None = None

    @property
    def flipped(self) -> bool | None:
        """The verdict changes with the order (each order's side of ½ differs)."""
        if self.p_first is None or self.p_second is None:
            return None
        return (self.p_first > 0.5) != (self.p_second > 0.5)


class Judge(Protocol):
    id: str
    template_id: str | None
    calls: int  # judge requests made (0 for a fully cached rerun)

    def judge(self, pairs: Sequence[Pair], progress: bool = True) -> list[Verdict]: ...


@dataclass
class Template:
    """A pairwise prompt with ``{instruction}``, ``{output_1}`` (A) and ``{output_2}`` (B)."""

    id: str
    text: str

    def render(self, instruction: str, first: str, second: str) -> str:
        # replace, not str.format: outputs may contain braces
        return (self.text.replace("{instruction}", instruction)
                .replace("{output_1}", first).replace("{output_2}", second))


def load_template(spec: str | None) -> Template:
    """A shipped template by name (``chat``, ``tldr``) or a user's file; the id of a file
    includes a hash of its text, so editing it invalidates the cache."""
    spec = spec or "chat"
    shipped = TEMPLATES / f"{spec}.txt"
    if shipped.is_file():
        return Template(spec, shipped.read_text())
    path = Path(spec)
    if not path.is_file():
        names = sorted(p.stem for p in TEMPLATES.glob("*.txt"))
        raise ConfigError(f"--template {spec!r}: neither a shipped template {names} nor a file")
    text = path.read_text()
    missing = [k for k in ("{instruction}", "{output_1}", "{output_2}") if k not in text]
    if missing:
        raise ConfigError(f"{path}: template lacks the placeholder(s) {', '.join(missing)}")
    return Template(f"file:{path.name}:{hashlib.sha256(text.encode()).hexdigest()[:12]}", text)


Compare = Callable[[list[tuple[str, str, str]]], list[tuple[float | None, str]]]


class PairwiseJudge:
    """Both-order judging over a single-order ``_compare``: [(prompt, A, B)] → [(P(A ≻ B) or
    None, raw answer)], with the cache consulted first and filled after every batch."""

    id: str = "pairwise"
    template_id: str | None = None

    def __init__(self, cache: Any = None, batch_size: int = 16,
                 max_unparsed: float = MAX_UNPARSED) -> None:
        self.cache, self.batch_size, self.max_unparsed = cache, batch_size, max_unparsed
        self.calls = 0
        self.unparsed_examples: list[str] = []

    def _compare(self, items: list[tuple[str, str, str]]) -> list[tuple[float | None, str]]:
        raise NotImplementedError

    def judge(self, pairs: Sequence[Pair], progress: bool = True) -> list[Verdict]:
        from distalign.progress import StepProgress

        items = []
        for pr in pairs:
            items += [(pr.prompt, pr.output, pr.reference), (pr.prompt, pr.reference, pr.output)]
        answers: dict[int, float | None] = {}
        todo = []
        for i, it in enumerate(items):
            hit = self.cache.get(self.id, self.template_id, *it) if self.cache is not None else None
            if hit is not None:
                answers[i] = hit[0]
            else:
                todo.append(i)
        bar = StepProgress(f"judge {self.id}", len(todo), enabled=progress and bool(todo),
                           every=max(len(todo) // 20, 1))
        with bar:
            for s in range(0, len(todo), self.batch_size):
                idx = todo[s : s + self.batch_size]
                out = self._compare([items[i] for i in idx])
                self.calls += len(idx)
                for i, (p, raw) in zip(idx, out, strict=True):
                    answers[i] = p
                    if p is None and len(self.unparsed_examples) < 3:
                        self.unparsed_examples.append(raw[:80])
                if self.cache is not None:
                    done = zip(idx, out, strict=True)
                    self.cache.put_many(self.id, self.template_id,
                                        [(*items[i], p, raw) for i, (p, raw) in done])
                bar.update(s + len(idx))
        verdicts = [_combine(answers[2 * k], answers[2 * k + 1]) for k in range(len(pairs))]
        bad = sum(v is None for v in answers.values())
        if items and bad > self.max_unparsed * len(items):
            raise DataError(
                f"judge {self.id}: {bad} of {len(items)} answers are unparseable (more than "
                f"{self.max_unparsed:.0%}); e.g. {self.unparsed_examples[:1]}; answers so far "
                "are cached"
            )
        return verdicts


def _combine(p_ab: float | None, p_ba: float | None) -> Verdict:
    """Output as A gives P(output ≻ ref) = P(A); output as B gives 1 − P(A). Average the
    orders; one unparseable order leaves the other (counted, never a coin flip)."""
    second = None if p_ba is None else 1.0 - p_ba
    vals = [v for v in (p_ab, second) if v is not None]
    return Verdict(sum(vals) / len(vals) if vals else None, p_ab, second)
