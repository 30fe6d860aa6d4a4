"""``distalign report RUNS... [--metrics a,b] [--group-by method] [--out report.md]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distalign.cli._app import app, comma_list


@app.command(
    help="Aggregate run directories (synthetic or real; eval.json from `distalign eval` "
    "included) into a Table-2-style markdown table (mean ± std over seeds, one row per method "
    "and differing setting) and a bar plot."
)
def report(
    runs: Annotated[
        list[Path], typer.Argument(help="run directories, or folders searched for them")
    ],
    metrics: Annotated[
        str | None,
        typer.Option("--metrics", "-m", help="comma-separated metric keys (default: known "
                     "quality, reward and KL metrics found in the runs)"),
    ] = None,
    group_by: Annotated[
        str | None, typer.Option("--group-by", "-g", help="comma-separated: method, name, seed "
                                 "or dotted config keys such as algo.beta (default: method and "
                                 "every config key that differs between its runs)")
    ] = None,
    include_incomplete: Annotated[
        bool, typer.Option("--include-incomplete", help="also average runs without "
                           "summary.json (killed or still running), marked as such")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="also write the table to this .md file")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="write the bar plot here (default: next to "
                                  "--out, as .png)")
    ] = None,
) -> None:
    from distalign.errors import ConfigError
    from distalign.eval.report import report as build
    from distalign.pipeline.data import check_writable

    plot_path = plot or (out.with_suffix(".png") if out else None)
    for flag, path in (("--out", out), ("--plot", plot_path)):
        if path is not None:  # before the runs are read: a bad path fails in one line
            if path.is_dir():
                raise ConfigError(f"{flag} {path}: is a directory; give a file name")
            check_writable(path.parent, f"{flag} folder", create=False)
    try:
        table, rows = build(runs, comma_list(metrics, "--metrics"),
                            comma_list(group_by, "--group-by"), plot_path, include_incomplete)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
    except OSError as exc:  # a read-only folder or file system (root passes the check above)
        raise ConfigError(f"cannot write {exc.filename or out or plot_path} "
                          f"({exc.strerror})") from None
    typer.echo(table, nl=False)
    n = sum(len(r.runs) for r in rows)
    where = ", ".join(str(p) for p in (out, plot_path) if p)
    typer.echo(f"\n{n} runs in {len(rows)} rows" + (f"; wrote {where}" if where else ""))
