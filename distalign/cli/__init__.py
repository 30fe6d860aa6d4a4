"""``distalign`` command line: thin wrappers that parse config and call the library."""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys

import typer

from distalign.cli._app import app
from distalign.errors import DistalignError, Interrupted

_COMMAND_MODULES = ("toy", "train", "generate", "eval", "report", "synthetic", "tilted",
                    "pipeline")


def _register(argv: list[str]) -> None:
    # `distalign toy` registers its own command only: the others import torch at module level
    # (1.3 s), more than a third of the toy's whole time budget
    names = ("toy",) if argv[:1] == ["toy"] else _COMMAND_MODULES
    for name in names:
        importlib.import_module(f"distalign.cli.{name}")


def _single_dash_hint(argv: list[str]) -> str | None:
    """``-config x.yaml`` parses as ``-c onfig``, which then reads as a missing file called
    'onfig': name the long option the user meant instead."""
    import typer.main

    group = typer.main.get_command(app)
    command = group.commands.get(argv[0]) if argv else None  # type: ignore[attr-defined]
    if command is None:
        return None
    longs = {o for p in command.params for o in getattr(p, "opts", []) if o.startswith("--")}
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if name.startswith("-") and not name.startswith("--") and f"-{name}" in longs:
            return f"{name} has one dash, so it reads as short options; did you mean -{name}?"
    return None


def _disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
        "No space left on device" in str(exc))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit with status 2; SIGINT and SIGTERM
    print one line and exit 130 and 143 (training first finishes its step and checkpoints)."""
    if not sys.stderr.isatty():
        # third-party tqdm bars (transformers' GGUF de-quantisation calls tqdm directly, past
        # its own switch) are carriage-return noise in a log file; tqdm reads this at import
        os.environ.setdefault("TQDM_DISABLE", "1")
    args = sys.argv[1:] if argv is None else argv
    _register(args)
    hint = _single_dash_hint(args)
    if hint:
        typer.echo(f"error: {hint}", err=True)
        sys.exit(2)
    # typer would turn Ctrl-C into a return value that standalone_mode=False drops (exit 0)
    from distalign.signals import SIGNALS, raise_interrupted

    for s in SIGNALS:
        signal.signal(s, raise_interrupted)
    try:
        code = app(args=argv, standalone_mode=False)
    except Interrupted as exc:
        typer.echo(f"{exc.message or 'interrupted'}", err=True)
        sys.exit(128 + exc.signum)
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
        if _disk_full(exc):  # safetensors raises its own type, so match the OS's words too
            typer.echo(f"error: no space left on device ({str(exc).splitlines()[0]}); free "
                       "some and rerun the same command: it resumes from its last checkpoint",
                       err=True)
            sys.exit(1)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
