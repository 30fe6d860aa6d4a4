"""``distalign pipeline CONFIG.yaml [--dry-run] [--only ...] [--methods ...] [--seeds ...]``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from distalign.cli._app import app
from distalign.errors import ConfigError


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


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
                           "is already done; load no model")
    ] = False,
    only: Annotated[
        str | None, typer.Option("--only", help="comma-separated stages, stage kinds (data, "
                                 "base, sft, reward, train, generate, eval, report) or methods")
    ] = None,
    methods: Annotated[
        str | None, typer.Option("--methods", help="comma-separated subset of the config's "
                                 "methods")
    ] = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="comma-separated seeds (replace the config's)")
    ] = None,
) -> None:
    from distalign.pipeline.config import load_pipeline
    from distalign.pipeline.plan import plan, select
    from distalign.pipeline.runner import run_stages

    pc = load_pipeline(config, overrides or [])
    if (wanted := _split(methods)) is not None:
        unknown = [m for m in wanted if m not in pc.methods]
        if unknown:
            raise ConfigError(f"--methods: unknown stage {unknown[0]!r} (the config has: "
                              f"{', '.join(pc.methods)})")
        pc.methods = {m: pc.methods[m] for m in wanted}
    if (ss := _split(seeds)) is not None:
        try:
            pc.seeds = [int(s) for s in ss]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    p = plan(pc, dry_run=dry_run)
    typer.echo(f"pipeline {pc.name}: π₀ = {p.base}; {len(p.stages)} stages in {pc.out}")
    typer.echo(p.table())
    if dry_run:
        return
    import transformers

    # the stages report their own progress; HF's per-load bars (GGUF de-quantisation, shard
    # writing) are carriage-return noise in a log file
    transformers.utils.logging.disable_progress_bar()
    names = None
    if (picked := _split(only)) is not None:
        names = {s.name for s in select(p.stages, picked)}
    t0 = time.perf_counter()
    outcomes = run_stages(p.stages, launcher=pc.launcher, only=names, log=typer.echo)
    ran = sum(not o.reused for o in outcomes.values())
    report = pc.out / "report.md"
    if "report" in outcomes and report.is_file():
        typer.echo("\n" + report.read_text())
    typer.echo(f"{ran} stages run, {len(outcomes) - ran} already done, "
               f"{time.perf_counter() - t0:.0f}s; outputs in {pc.out}")
