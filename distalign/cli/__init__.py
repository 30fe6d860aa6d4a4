"""``distalign`` command line: thin wrappers that parse config and call the library."""

from __future__ import annotations

import importlib
import sys

import typer

from distalign.cli._app import app
from distalign.errors import DistalignError

_COMMAND_MODULES = ("toy", "train", "generate", "eval", "report", "synthetic", "pipeline")


def _register() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"distalign.cli.{name}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit with status 2."""
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except DistalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        # typer ships its own click; both kinds of usage error carry these two attributes
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code or 2)
        raise
