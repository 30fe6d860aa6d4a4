"""``distalign generate MODEL --prompts DATA --out FILE.jsonl [gen.KEY=VALUE ...]``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from distalign.cli._app import app
from distalign.lm.threads import THREADS_HELP, set_threads


@app.command(
    help="Sample responses of MODEL (a run directory, an HF model directory or hub id, or a "
    "GGUF with --gguf-file) to a prompt set, one JSONL row per sample plus a .meta.json "
    "sidecar. Resumable: a rerun generates only the missing rows.",
)
def generate(
    model: Annotated[str, typer.Argument(help="run dir (uses final/), model dir, hub id or .gguf")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="sampling overrides, e.g. gen.temperature=0 gen.max_new_tokens=64"),
    ] = None,
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="json/jsonl/parquet file or "
                                         "hub dataset (NAME or NAME:SPLIT)")] = "",
    out: Annotated[Path, typer.Option("--out", "-o", help="generations file (.jsonl)")] = Path(
        "generations.jsonl"),
    fmt: Annotated[str, typer.Option("--format", "-f", help="auto | prompt | alpaca_eval | hh | "
                                     "messages")] = "auto",
    gguf_file: Annotated[str | None, typer.Option("--gguf-file", help="GGUF file in MODEL")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 | auto")] = "float32",
    limit: Annotated[int | None, typer.Option(help="first N prompts only")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="samples per prompt")]
    = 1,
    seed: Annotated[int, typer.Option(help="sampling seed (batch seeds derive from it)")] = 0,
    batch_size: Annotated[int, typer.Option(help="prompts per generation batch")] = 16,
    max_prompt_length: Annotated[int | None, typer.Option(
        help="prompt tokens; longer prompts are cut from the left and counted")] = None,
    generator: Annotated[str | None, typer.Option(help="name in the rows (default: from MODEL)")]
    = None,
    chat_template: Annotated[bool | None, typer.Option(
        "--chat-template/--no-chat-template",
        help="render every prompt as a user turn / instructions as plain text "
        "(default: conversations and instructions use the template, plain prompts do not)",
    )] = None,
    alpaca_eval: Annotated[bool, typer.Option(
        "--alpaca-eval", help="also write model_outputs.json for alpaca_eval")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing generations file")] = False,
    progress: Annotated[bool, typer.Option(help="progress bar / lines")] = True,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
) -> None:
    from distalign.errors import ConfigError
    from distalign.eval.generate import MODEL_OUTPUTS, gen_config, sidecar_path
    from distalign.eval.generate import generate as run_generate

    started = time.time()
    if not prompts:
        raise ConfigError("--prompts is required (a json/jsonl/parquet file or hub dataset)")
    set_threads(threads)
    path = run_generate(
        model, prompts, out, fmt=fmt, gguf_file=gguf_file, limit=limit,
        gen=gen_config(list(overrides or [])), num_samples=num_samples, seed=seed,
        batch_size=batch_size, max_prompt_length=max_prompt_length, generator=generator,
        alpaca_eval=alpaca_eval, progress=progress, dtype=dtype, chat_template=chat_template,
        overwrite=overwrite,
    )
    typer.echo(f"generations: {path}  (settings: {sidecar_path(path)})")
    outputs = path.with_name(MODEL_OUTPUTS)
    if outputs.is_file() and outputs.stat().st_mtime >= started:
        typer.echo(f"alpaca_eval model outputs: {outputs}")
