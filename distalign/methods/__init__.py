"""Method registry: one short file per method, each composing ``objectives/`` and ``lm/``."""

from __future__ import annotations

from importlib import import_module

from distalign.errors import ConfigError
from distalign.methods.base import Context, Method
from distalign.methods.config import AlgoConfig

METHODS = ("sft", "reward", "dpo", "pmle", "rebel", "distill", "rlhf", "rkl")


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module = import_module(f"distalign.methods.{name}")
    return module.METHOD


__all__ = ["METHODS", "AlgoConfig", "Context", "Method", "get_method"]
