"""The ``algo`` section that every method's config extends.

It holds what the engine reads of every method (``update_epochs``) and the method's checks,
stated as tables in the form ``train.config`` uses for the other sections: ``RULES`` of
(field, test, requirement), ``CHOICES`` of (field, allowed values) and ``HINTS`` of
(a key the config lacks, the key that holds that setting, why). Each class lists only its
own entries; the class methods combine them along the bases, so a subclass cannot drop a
base's check by forgetting to repeat it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

Rule = tuple[str, Callable[[Any], bool], str]  # "algo.<field> must be <requirement>, got <v>"
Choice = tuple[str, tuple[str, ...]]
Hint = tuple[str, str, str]  # (misnamed key, right key, why)


@dataclass
class AlgoConfig:
    """Settings every method has. Subclasses add fields and their own table entries."""

    # passes of updates over each batch of collected experience (the engine's k)
    update_epochs: int = 1

    RULES: ClassVar[tuple[Rule, ...]] = (("update_epochs", lambda v: v >= 1, ">= 1"),)
    CHOICES: ClassVar[tuple[Choice, ...]] = ()
    HINTS: ClassVar[tuple[Hint, ...]] = ()

    @classmethod
    def _table(cls, name: str) -> list[Any]:
        return [e for k in reversed(cls.__mro__) for e in vars(k).get(name, ())]

    @classmethod
    def rules(cls) -> list[Rule]:
        return cls._table("RULES")

    @classmethod
    def choices(cls) -> list[Choice]:
        return cls._table("CHOICES")

    @classmethod
    def hint(cls, key: str) -> str | None:
        """For a key this config lacks: ``Did you mean: 'algo.<right>'? (why)``, or None."""
        for wrong, right, why in cls._table("HINTS"):
            if wrong == key:
                return f"Did you mean: 'algo.{right}'? ({why})"
        return None
