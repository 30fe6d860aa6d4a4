"""``distalign eval GENERATIONS.jsonl [--judge SPEC] [--reward-model DIR] [--ref-model DIR]
--out DIR`` and ``distalign eval --annotations FILE.json[.gz] --out DIR``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from distalign.cli._app import app
from distalign.errors import ConfigError
from distalign.lm.threads import THREADS_HELP, set_threads


def _fmt(value: Any, se: Any = None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    if se is not None and isinstance(se, float) and math.isfinite(se):
        text += f" ± {se:.2g}"
    return text


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human summary of eval.json: one line per measured quantity."""
    m = result["metrics"]
    lines = []
    if "eval/win_rate" in m:
        ci = result.get("win_rate_ci95") or [None, None]
        lines.append(
            f"win-rate {_fmt(m['eval/win_rate'], m.get('eval/win_rate_se'))} % "
            f"(95% CI {_fmt(ci[0])}–{_fmt(ci[1])}; discrete {_fmt(m['eval/win_rate_discrete'])}"
            f" %; wins/ties/losses {result.get('wins')}/{result.get('ties')}/"
            f"{result.get('losses')}; unparsed {result.get('unparsed')}"
            + (f"; flip rate {_fmt(result['flip_rate'])}" if result.get("flip_rate") is not None
               else "") + f"; judge {result.get('judge')})"
        )
    if "eval/rm_score" in m:
        lines.append(f"RM score {_fmt(m['eval/rm_score'], m.get('eval/rm_score_se'))} "
                     f"({result.get('no_eos', 0)} outputs without EOS)")
    if "eval/kl_ref" in m:
        lines.append(f"KL(π‖π₀) k1 {_fmt(m['eval/kl_ref'], m.get('eval/kl_ref_se'))}, "
                     f"k3 {_fmt(m['eval/kl_ref_k3'], m.get('eval/kl_ref_k3_se'))} "
                     f"(at T={result.get('kl_temperature')})")
    lines.append(f"n = {m.get('eval/n')}")
    return lines


@app.command(
    "eval",
    help="Evaluate a generations file: win-rate against the reference with a judge "
    "(reward:DIR, hf:DIR[@GGUF], openai:MODEL --judge-url URL, oracle), RM score, KL(π‖π₀). "
    "Or aggregate an AlpacaEval annotations file with --annotations.",
)
def eval_cmd(
    generations: Annotated[
        Path | None, typer.Argument(help="generations .jsonl written by `distalign generate`")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="output folder (default: eval/ next to "
                                  "the generations file)")
    ] = None,
    judge: Annotated[
        str | None, typer.Option("--judge", help="reward:DIR, hf:DIR[@FILE.gguf], openai:MODEL "
                                 "(with --judge-url) or oracle[:WORLD.json]")
    ] = None,
    judge_url: Annotated[
        str | None, typer.Option("--judge-url", help="base URL of an OpenAI-compatible server "
                                 "(API key from $DISTALIGN_JUDGE_API_KEY or $OPENAI_API_KEY)")
    ] = None,
    template: Annotated[
        str | None, typer.Option("--template", help="pairwise template: chat, tldr or a file "
                                 "with {instruction}, {output_1}, {output_2}")
    ] = None,
    reward_model: Annotated[
        str | None, typer.Option("--reward-model", help="reward model for the RM score")
    ] = None,
    ref_model: Annotated[
        str | None, typer.Option("--ref-model", help="reference π₀ for KL(π‖π₀)")
    ] = None,
    policy_model: Annotated[
        str | None, typer.Option("--policy-model", help="π for KL (default: the sidecar's "
                                 "model_path)")
    ] = None,
    prompt_set: Annotated[
        str | None, typer.Option("--prompt-set", help="the prompts these generations must come "
                                 "from: a sha256 digest, another generations file or the "
                                 "prompts data file")
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="openai judge: parallel requests")
    ] = 8,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="openai judge: seconds per request")
    ] = 60.0,
    max_retries: Annotated[
        int, typer.Option("--max-retries", min=0, help="openai judge: retries with backoff "
                          "on connection errors, 429 and 5xx")
    ] = 5,
    annotations: Annotated[
        Path | None, typer.Option("--annotations", help="aggregate this AlpacaEval annotations "
                                  "file (.json or .json.gz) instead")
    ] = None,
    judge_prompts: Annotated[
        int | None, typer.Option("--judge-prompts", min=1, help="judge only the samples of the "
                                 "first N prompt ids (a cheaper judge column; RM score and KL "
                                 "use every row)")
    ] = None,
    base_generations: Annotated[
        Path | None, typer.Option("--base-generations", help="π₀'s generations on the same "
                                  "prompts: with --judge oracle:WORLD of a tilted world, adds "
                                  "its measures (KL(π*‖π) and KL(π‖π*), gold reward, ...)")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="judge cache folder (default: --out)")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
) -> None:
    import transformers

    from distalign.eval.evaluate import evaluate, evaluate_annotations

    set_threads(threads)

    # our own progress lines say what is loading and scoring; per-file bars are noise in logs
    transformers.utils.logging.disable_progress_bar()

    if annotations is not None:
        if generations is not None:
            raise ConfigError("give either a generations file or --annotations, not both")
        result = evaluate_annotations(annotations, out or annotations.parent / "eval")
        where = out or annotations.parent / "eval"
    else:
        if generations is None:
            raise ConfigError("missing GENERATIONS.jsonl (or --annotations FILE)")
        where = out or generations.parent / "eval"
        result = evaluate(
            generations, where, judge=judge, reward_model=reward_model, ref_model=ref_model,
            policy_model=policy_model, template=template, batch_size=batch_size,
            cache_dir=cache_dir, progress=progress, judge_url=judge_url, prompt_set=prompt_set,
            judge_options={"concurrency": concurrency, "timeout": timeout,
                           "max_retries": max_retries} if (judge or "").startswith("openai:")
            else None, judge_prompts=judge_prompts, base_generations=base_generations,
        )
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(f"wrote {where / 'eval.json'}")
