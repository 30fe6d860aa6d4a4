"""The typer application shared by every ``distalign`` sub-command module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from distalign.errors import ConfigError

app = typer.Typer(
    name="distalign",
    help="Alignment as distribution learning: PMLE, preference distillation, reverse KL, "
    "DPO, REBEL and RLHF-PPO on one engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from distalign import __version__

        typer.echo(f"distalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True,
                     help="print the version and exit"),
    ] = False,
) -> None:
    """Alignment as distribution learning (see `distalign COMMAND --help`)."""


def comma_list(value: str | None, flag: str, cast: Callable[[str], Any] = str,
               minimum: float | None = None) -> list[Any] | None:
    """``"a, b,c"`` → ``["a", "b", "c"]`` (each item ``cast``; empty items dropped); None for no
    value. Every comma-separated option of every command parses here, so they agree on spaces,
    empty items and the one-line error."""
    if value is None or not value.strip():
        return None
    try:
        out = [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(cast, "values")  # type: ignore[call-overload]
        raise ConfigError(f"{flag} must be comma-separated {kind}, got {value!r}") from None
    if minimum is not None and (not out or min(out) < minimum):
        raise ConfigError(f"{flag} must be values >= {minimum:g}, got {value!r}")
    return out
