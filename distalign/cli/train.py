"""``distalign train METHOD --config FILE.yaml [key=value ...]``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from distalign.cli._app import app
from distalign.methods import METHODS


@app.command(
    context_settings={"allow_extra_args": False},
    help=f"Train with one method ({', '.join(METHODS)}). Runs as is or under "
    "`accelerate launch` (DDP; FSDP/DeepSpeed via accelerate configs).",
)
def train(
    method: Annotated[str, typer.Argument(help=f"one of: {', '.join(METHODS)}")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="dotted overrides, e.g. algo.beta=0.1 run.max_steps=100"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML run config")
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="print the resolved config and exit")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="replace the run that run.output_dir/run.name holds"),
    ] = False,
) -> None:
    from distalign.lm.threads import set_threads
    from distalign.train import load_config
    from distalign.train import train as run_training
    from distalign.train.config import check_sources, to_yaml

    extra = ["run.overwrite=true"] if overwrite else []
    cfg = load_config(method, config, [*(overrides or []), *extra],
                      require_paths=not print_config)
    if print_config:
        typer.echo(to_yaml(cfg))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_sources(cfg)  # a path typo is one line now, not after the policy has loaded
    # stdout, with the run's other notes: stderr stays the one line of an error
    typer.echo("torch CPU threads: {} ({})".format(*set_threads(cfg.run.threads, "run.threads")))
    run_dir = run_training(cfg)
    typer.echo(f"run directory: {run_dir}  (final model: {run_dir / 'final'})")
