"""The typer application shared by every ``distalign`` sub-command module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="distalign",
    help="Alignment as distribution learning: PMLE, preference distillation, reverse KL, "
    "DPO, REBEL and RLHF-PPO on one engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Alignment as distribution learning (see `distalign COMMAND --help`)."""
