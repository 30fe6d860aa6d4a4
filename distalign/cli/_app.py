"""The typer application shared by every ``distalign`` sub-command module."""

from __future__ import annotations

from typing import Annotated

import typer

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
