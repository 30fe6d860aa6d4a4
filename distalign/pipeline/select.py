"""``distalign pipeline --only``: which stages a word names, checked against the plan."""

from __future__ import annotations

import difflib

from distalign.errors import ConfigError
from distalign.pipeline.runner import Stage, status

KINDS = ("data", "base", "world", "sft", "reward", "train", "generate", "eval", "report",
         "claims")


def _picks(stages: list[Stage], o: str) -> list[Stage]:
    """The stages one ``--only`` word names. A stage's own name or a kind picks exactly those
    (``base``: π₀'s export alone, ``dpo-s0``: that training run alone); otherwise a group
    (``eval-rm``: the second judge's stages), a method (its training runs) or a row without
    a stage of its own (``base`` when π₀ needs no export: its generate and eval stages)."""
    exact = [s for s in stages if s.name == o or s.kind == o]
    if exact:
        return exact
    return [s for s in stages if s.name.split("/")[0] == o or s.name.split("-s")[0] == o
            or s.name.endswith("/" + o)]


def select(stages: list[Stage], only: list[str]) -> list[Stage]:
    """Stages named (or of a kind, or of a method) in ``only``; every dependency outside the
    selection must already be done. Checked by ``--dry-run`` too."""
    picked: list[Stage] = []
    for o in only:
        found = _picks(stages, o)
        if not found:
            words = sorted({*KINDS, *(s.kind for s in stages), *(s.name for s in stages),
                            *(s.name.split("/")[0] for s in stages),
                            *(s.name.split("-s")[0] for s in stages if s.kind == "train")})
            close = difflib.get_close_matches(o, words, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"--only: unknown stage {o!r} ({hint}stages: "
                              f"{', '.join(s.name for s in stages)})")
        picked += [s for s in found if s not in picked]
    names = {s.name for s in picked}
    by_name = {s.name: s for s in stages}
    for s in picked:
        for d in s.deps:
            if d not in names and status(by_name[d]) != "done":
                raise ConfigError(f"--only: stage {s.name!r} depends on stage {d!r}, which is "
                                  "not done; add it to --only or run without --only")
    return [s for s in stages if s.name in names]  # in the plan's order
