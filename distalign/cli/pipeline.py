"""``distalign pipeline CONFIG.yaml [--dry-run] [--only ...] [--methods ...] [--seeds ...]
[--overwrite]``."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from distalign.cli._app import app, comma_list
from distalign.errors import ConfigError

# what a stage's OSError means when it is about the output directory, not a bug
_WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST,
                 errno.ENOSPC, errno.EDQUOT}


@app.command(
    help="Run a whole comparison: sft (optional), reward, methods × seeds, generate, eval and "
    "the Table-2-style report with the π₀ row. Finished stages are skipped and interrupted "
    "ones resume, so rerunning the same command after a crash or kill continues it. "
    "See docs/pipeline.md."
)
def pipeline(
    config: Annotated[Path, typer.Argument(help="pipeline YAML (e.g. configs/pipelines/...)")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="pipeline config overrides, e.g. output_dir=runs/x seeds=[0]"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the stages, their directories and what "
                           "is already done (and check --only); load no model")
    ] = False,
    only: Annotated[
        str | None, typer.Option("--only", help="comma-separated stages (a stage's name picks "
                                 "it alone), stage kinds (data, base, sft, reward, train, "
                                 "generate, eval, report) or methods")
    ] = None,
    methods: Annotated[
        str | None, typer.Option("--methods", help="comma-separated subset of the config's "
                                 "methods")
    ] = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="comma-separated seeds (replace the config's)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="a training stage whose run directory holds a "
                           "run with another config replaces it instead of stopping (partial "
                           "runs of the same config still resume; finished stages stay)")
    ] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads of every stage "
                                                "(passed on as OMP_NUM_THREADS; default: "
                                                "chosen per stage, see `distalign generate "
                                                "--help`)")] = None,
) -> None:
    from distalign.pipeline.config import load_pipeline
    from distalign.pipeline.data import check_writable
    from distalign.pipeline.plan import plan
    from distalign.pipeline.report import accuracy_line
    from distalign.pipeline.runner import run_stages
    from distalign.pipeline.select import select

    pc = load_pipeline(config, overrides or [])
    if (wanted := comma_list(methods, "--methods")) is not None:
        unknown = [m for m in wanted if m not in pc.methods]
        if unknown:
            raise ConfigError(f"--methods: unknown stage {unknown[0]!r} (the config has: "
                              f"{', '.join(pc.methods)})")
        pc.methods = {m: pc.methods[m] for m in wanted}
    if (ss := comma_list(seeds, "--seeds")) is not None:
        try:
            pc.seeds = [int(s) for s in ss]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    check_writable(pc.out, "output_dir", create=False)
    p = plan(pc, dry_run=dry_run)
    names = None
    # checked before anything runs, dry run or not
    if (picked := comma_list(only, "--only")) is not None:
        names = {s.name for s in select(p.stages, picked)}
    typer.echo(f"pipeline {pc.name}: π₀ = {p.base}; {len(p.stages)} stages in {pc.out}")
    typer.echo(p.table())
    if names is not None:
        typer.echo(f"--only: {', '.join(s.name for s in p.stages if s.name in names)}")
    if dry_run:
        return
    check_writable(pc.out, "output_dir", create=True)
    if overwrite:
        for s in p.stages:
            if s.target.endswith(":train_run"):
                s.options["overwrite"] = True
    import transformers

    if threads is not None:  # stages run in child processes, which read it at start-up
        os.environ["OMP_NUM_THREADS"] = str(threads)
    # the stages report their own progress; HF's per-load bars (GGUF de-quantisation, shard
    # writing) are carriage-return noise in a log file
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        outcomes = run_stages(p.stages, launcher=pc.launcher, only=names, log=typer.echo)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRORS:
            raise
        raise ConfigError(f"cannot write {exc.filename or pc.out} ({exc.strerror})") from None
    ran = sum(not o.reused for o in outcomes.values())
    report = pc.out / "report.md"
    if "report" in outcomes and report.is_file():
        typer.echo("\n" + report.read_text())
    typer.echo(f"{ran} stages run, {len(outcomes) - ran} already done, "
               f"{time.perf_counter() - t0:.0f}s; outputs in {pc.out}")
    # the last line a user reads: every RM-judged number above is only as good as this
    reward = next((s.spec.get("reward") for s in p.stages if s.kind == "report"), None)
    if (line := accuracy_line(reward)) is not None:
        typer.echo(line)
