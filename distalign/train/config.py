"""Typed run configuration: YAML + dotted ``key=value`` overrides via OmegaConf.

One ``TrainConfig`` is one run; the run directory keeps a copy of it as ``config.yaml``.
Method hyper-parameters live in ``algo``, a subclass of :class:`AlgoConfig` that each method
file declares together with its checks (rule tables, checked here like the other sections').
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from distalign.errors import ConfigError
from distalign.lm.data import DataConfig
from distalign.lm.datafiles import check_data_source
from distalign.lm.generation import GenerationConfig
from distalign.lm.models import ModelConfig
from distalign.lm.sources import check_source
from distalign.methods.config import AlgoConfig


@dataclass
class OptimConfig:
    lr: float = 1e-5
    scheduler: str = "linear"  # linear | cosine | constant (decay over all optimizer steps)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    batch_size: int = 8  # examples (pairs or prompts) collected per step, per process
    mini_batch_size: int | None = None  # examples per optimizer step (default: batch_size)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # collect→update steps; default: `epochs` passes over the data
    epochs: float = 1.0
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the start and the end
    # the step-0 evaluation of π before training (a baseline row); false saves one pass over
    # the eval data (a short run's RM accuracy on 200 pairs costs as much as 12 of its steps)
    eval_at_start: bool = True
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint (same config only); false: restart
    overwrite: bool = False  # replace whatever run the directory holds (`--overwrite`)
    # accelerate trackers: tensorboard, wandb (one name alone counts as a one-element list)
    report_to: list[str] = field(default_factory=list)
    progress: bool = True
    mixed_precision: str = "no"  # no | bf16 | fp16 | fp8 (accelerate; YAML `no` is accepted)
    num_samples_logged: int = 2  # generations written to samples.jsonl per logged step
    # torch CPU threads per process; null: OMP_NUM_THREADS if set, else the cores this process
    # may use (shared among accelerate's processes) less those busy with other work (load
    # average). On a loaded 2-core host 1 thread generated 13x faster than torch's default 2
    threads: int | None = None


@dataclass
class TrainConfig:
    method: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(path=""))
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # the schema holds the method's own subclass (``_schema``), so its fields are the keys
    algo: AlgoConfig = field(default_factory=AlgoConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def _algo_class(method: str) -> type[AlgoConfig]:
    from distalign.methods import get_method

    return get_method(method).Config


def _schema(method: str) -> Any:
    return OmegaConf.structured(TrainConfig(method=method, algo=_algo_class(method)()))


def default_config(method: str) -> dict[str, Any]:
    """Every setting of ``method`` at its default, as a plain dict (what a key missing from an
    older run's config.yaml meant when that run was made)."""
    return OmegaConf.to_container(_schema(method), resolve=False)  # type: ignore[return-value]


def load_config(
    method: str,
    config: str | Path | dict | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    require_paths: bool = True,
) -> TrainConfig:
    """Build a validated ``TrainConfig`` from a YAML path or dict plus ``a.b=value`` overrides.

    Unknown keys and ill-typed values raise a one-line ``ConfigError``. ``require_paths=False``
    accepts an empty model/data path (``--print-config`` of the defaults).
    """
    schema = _schema(method)
    sources: list[Any] = []
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml parse errors
            raise ConfigError(f"{path}: cannot parse YAML ({str(exc).splitlines()[0]})") from exc
        if "method" in loaded and loaded.method not in (None, method):
            raise ConfigError(f"{path}: file is for method {loaded.method!r}, not {method!r}")
        sources.append(loaded)
    elif isinstance(config, dict):
        sources.append(OmegaConf.create(config))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        if overrides:
            sources.append(OmegaConf.from_dotlist(list(overrides)))
        for src in sources:  # `report_to: tensorboard` means the list of that one tracker
            if isinstance(src, DictConfig) and isinstance(OmegaConf.select(src, "run.report_to"),
                                                          str):
                src.run.report_to = [src.run.report_to]
        merged = OmegaConf.merge(schema, *sources)
        merged.method = method
        cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc, _algo_class(method))) from exc
    validate(cfg, require_paths)
    return cfg


def _omegaconf_message(exc: OmegaConfBaseException, algo: type[AlgoConfig]) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if not key:
        return msg
    # an unknown algo key the method knows under another name (DPO's `beta` is `gamma`)
    hint = None
    if isinstance(exc, ConfigKeyError) and key.startswith("algo."):
        hint = algo.hint(key.removeprefix("algo."))
    if hint:
        msg = f"{msg.split('. Did you mean')[0]}. {hint}"
    return f"config key {key!r}: {msg}"


def _floats(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for f in fields(obj) if is_dataclass(obj) else ():
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(v):
            out += _floats(v, key + ".")
        elif isinstance(v, float):
            out.append((key, v))
    return out


MIXED_PRECISION = ("no", "bf16", "fp16", "fp8")
# (key, test, requirement) for values whose type alone admits nonsense
_RULES: list[tuple[str, Any, str]] = [
    ("run.epochs", lambda v: v > 0, "> 0"),
    ("run.log_every", lambda v: v >= 1, ">= 1"),
    ("run.eval_every", lambda v: v >= 0, ">= 0 (0: only at the start and the end)"),
    ("run.save_every", lambda v: v >= 0, ">= 0 (0: no intermediate checkpoints)"),
    ("run.keep_checkpoints", lambda v: v >= 0, ">= 0 (0: keep all)"),
    ("run.num_samples_logged", lambda v: v >= 0, ">= 0"),
    ("run.threads", lambda v: v is None or v >= 1, ">= 1 (or null: see the key's comment)"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.max_grad_norm", lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    ("optim.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.adam_eps", lambda v: v > 0, "> 0"),
    ("model.lora.r", lambda v: v >= 1, ">= 1"),
    ("model.lora.alpha", lambda v: v > 0, "> 0"),
    ("model.lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("gen.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("gen.min_new_tokens", lambda v: v >= 0, ">= 0"),
    ("gen.temperature", lambda v: v > 0, "> 0 for training (samples must be stochastic)"),
    ("gen.top_k", lambda v: v >= 0, ">= 0 (0 disables top-k)"),
    ("gen.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
]
_CHOICES: list[tuple[str, tuple[str, ...]]] = [
    ("optim.scheduler", ("linear", "cosine", "constant")),
    ("run.mixed_precision", MIXED_PRECISION),
    ("model.lora.bias", ("none", "all", "lora_only")),
    ("model.dtype", ("float32", "bfloat16", "float16", "auto")),
]


def _get(cfg: TrainConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_trackers(names: list[str], installed: bool = True) -> None:
    """Every ``run.report_to`` entry must be a tracker accelerate knows and (``installed``,
    checked when training starts) can import: accelerate would otherwise drop it with a log
    line, and the run would log nothing."""
    import accelerate.utils as au
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    for name in names:
        if name not in known:
            raise ConfigError(f"run.report_to: unknown tracker {name!r}; one of {', '.join(known)}")
        available = getattr(au, f"is_{name}_available", None)
        if installed and available is not None and not available():
            hint = ("pip install 'distalign[tensorboard]'" if name == "tensorboard"
                    else f"pip install {name}")
            raise ConfigError(f"run.report_to: tracker {name!r} is not installed ({hint})")


def validate(cfg: TrainConfig, require_paths: bool = True) -> None:
    """Cross-field and range checks that types alone cannot express; one line per problem,
    naming the key."""
    r = cfg.run
    if require_paths and not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path is required")
    if require_paths and not cfg.data.path:
        raise ConfigError("data.path is required")
    # YAML 1.1 reads the documented `no` as False, which OmegaConf stores as "False"
    if str(r.mixed_precision).lower() in ("false", "none"):
        r.mixed_precision = "no"
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    # the method's own tables (``AlgoConfig.RULES``/``CHOICES``), checked the same way
    algo = type(cfg.algo)
    rules = [*_RULES, *((f"algo.{k}", ok, need) for k, ok, need in algo.rules())]
    choices = [*_CHOICES, *((f"algo.{k}", allowed) for k, allowed in algo.choices())]
    for key, ok, need in rules:
        if not ok(value := _get(cfg, key)):
            raise ConfigError(f"{key} must be {need}, got {value}")
    for key, allowed in choices:
        if (value := _get(cfg, key)) not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    if r.batch_size < 1:
        raise ConfigError(f"run.batch_size must be >= 1, got {r.batch_size}")
    mini = r.mini_batch_size or r.batch_size
    if mini < 1 or r.batch_size % mini:
        raise ConfigError(
            f"run.mini_batch_size ({mini}) must divide run.batch_size ({r.batch_size})"
        )
    if r.grad_accum < 1 or mini % r.grad_accum:
        raise ConfigError(f"run.grad_accum ({r.grad_accum}) must divide the mini-batch ({mini})")
    if r.max_steps is not None and r.max_steps < 1:
        raise ConfigError(f"run.max_steps must be >= 1, got {r.max_steps}")
    if not r.name or "/" in r.name or r.name in (".", ".."):
        raise ConfigError(f"run.name={r.name!r} must be a plain directory name")
    check_trackers(list(r.report_to), installed=False)


def check_sources(cfg: TrainConfig) -> None:
    """Before any model loads: every model path the method will load and every data path
    exists locally or on the hub (one line for a typo, with the closest local names), and a
    run directory given as a model stands for its ``final/`` (rewritten here, so the tokenizer
    comparison at start-up reads the same directory). Not part of :func:`validate`: a
    pipeline checks its stage configs before earlier stages have written their models."""
    from distalign.methods import get_method

    method, mc = get_method(cfg.method), cfg.model
    keys = ["name_or_path", "tokenizer"]
    keys += ["ref_model"] if method.needs_reference(cfg.algo) else []
    keys += ["reward_model"] if method.uses_reward_model or method.uses_value_model else []
    keys += ["value_model"] if method.uses_value_model else []
    for key in keys:
        if getattr(mc, key):
            setattr(mc, key, check_source(getattr(mc, key), f"model.{key}"))
    check_data_source(cfg.data.path, cfg.data.subset)
    if cfg.data.eval_path:
        check_data_source(cfg.data.eval_path)


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
