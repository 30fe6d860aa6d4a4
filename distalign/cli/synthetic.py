"""``distalign synthetic [--quick] [--out DIR] ...``: the ground-truth world benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distalign.cli._app import app, comma_list
from distalign.errors import ConfigError


@app.command(
    help="Train the alignment methods in a synthetic world with a known π* and report their "
    "exact forward KL (and win-rates) against the data size n. See docs/synthetic.md."
)
def synthetic(
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")] = Path(
        "runs/synthetic"
    ),
    quick: Annotated[
        bool, typer.Option("--quick", help="a few-minute smoke grid instead of the default")
    ] = False,
    methods: Annotated[
        str | None, typer.Option("--methods", help="comma-separated subset of: pmle, dpo, "
                                 "distill, rebel, rlhf, rkl")
    ] = None,
    sizes: Annotated[
        str | None, typer.Option("--sizes", help="data sizes n, e.g. 1024,4096")
    ] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="seeds, e.g. 0,1,2")] = None,
    reward_class: Annotated[
        str, typer.Option("--reward-class", help="reward model class: standard (the policy's "
                          "transformer), light (a linear scorer over π*'s Markov features, "
                          "the generator–verifier gap) or both")
    ] = "both",
    workers: Annotated[
        int | None, typer.Option("--workers", help="parallel training processes (default 2)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="retrain runs that already finished in --out")
    ] = False,
) -> None:
    from distalign.pipeline.synthetic_grid import run_grid
    from distalign.synthetic.config import default_config, quick_config

    kwargs: dict = {}
    if methods:
        kwargs["methods"] = tuple(comma_list(methods, "--methods") or ())
    for key, value in (("sizes", comma_list(sizes, "--sizes", int)),
                       ("seeds", comma_list(seeds, "--seeds", int))):
        if value:
            kwargs[key] = tuple(value)
    classes = {"both": ("standard", "light"), "standard": ("standard",), "light": ("light",)}
    if reward_class not in classes:
        raise ConfigError(f"--reward-class must be one of standard, light, both; got "
                          f"{reward_class!r}")
    kwargs["reward_classes"] = classes[reward_class]
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        kwargs["workers"] = workers
    try:
        cfg = (quick_config if quick else default_config)(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    results = run_grid(cfg, out, overwrite=overwrite, log=typer.echo)
    typer.echo((out / "synthetic_table.md").read_text())
    typer.echo((out / "claims.md").read_text())
    minutes, secs = divmod(round(results["seconds"]), 60)
    typer.echo(f"{len(results['runs'])} engine runs in {minutes} min {secs} s (wall); "
               f"results in {out}")
