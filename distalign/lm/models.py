"""Loading the policy π and scalar scorers (reward / value models), with checks that the
checkpoint is of the right kind. The reference π₀ is :mod:`distalign.lm.reference`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distalign.errors import ConfigError
from distalign.lm.sources import check_source, resolve_model_path
from distalign.lm.wrappers import disable_dropout, is_peft_model, unwrap_model

__all__ = ["DTYPES", "LoraConfig", "ModelConfig", "apply_lora", "disable_dropout", "load_causal_lm",
           "is_peft_model", "load_policy", "load_reward_model", "load_scorer", "load_tokenizer",
           "load_value_model", "resolve_model_path", "trainable_scorer", "unwrap_model"]

logger = logging.getLogger(__name__)

DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


@dataclass
class LoraConfig:
    """peft LoRA settings. ``target_modules=None`` means every linear layer ("all-linear")."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None
    bias: str = "none"


@dataclass
class ModelConfig:
    """Which checkpoints to load for π, π₀, the reward model and the value model.

    ``ref_model=None``: π₀ is the policy's initial weights — the adapter-disabled policy under
    LoRA, otherwise a frozen copy loaded from ``name_or_path``. ``value_model=None``: the PPO
    value model starts from ``reward_model`` (common PPO practice).
    """

    name_or_path: str = ""
    tokenizer: str | None = None
    chat_template: str | None = None  # a Jinja template, or a file holding one (overrides)
    gguf_file: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    disable_dropout: bool = True  # dropout off in trained models (deterministic PPO ratios)
    ref_model: str | None = None
    reward_model: str | None = None
    value_model: str | None = None


def _torch_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _load_error(what: str, path: str, err: Exception) -> ConfigError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"cannot load {what} from {path!r}: {first}")


def _common_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": _torch_dtype(cfg.dtype),  # transformers 5: `dtype`, not `torch_dtype`
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Tokenizer of ``cfg.tokenizer`` (or of the policy). A missing pad token becomes EOS.

    Pad == EOS is safe in this library because masks, not token ids, mark padding (see
    :func:`distalign.lm.scoring.sequence_scores`).
    """
    from transformers import AutoTokenizer

    path = cfg.tokenizer or cfg.name_or_path
    if not path:
        raise ConfigError("model.name_or_path (or model.tokenizer) is empty")
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    path = check_source(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except ImportError as err:
        raise ConfigError(f"loading {path!r} needs an extra package: {err}") from err
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer", path, err) from err
    if cfg.chat_template:
        tok.chat_template = _read_template(cfg.chat_template)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer {path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
        logger.info("tokenizer %s has no pad token; using EOS %r as pad", path, tok.eos_token)
    return tok


def _read_template(value: str) -> str:
    """``model.chat_template``: template text, or the path of a file (.jinja etc.) holding it."""
    if "{" not in value:
        path = os.path.expanduser(value)
        if not os.path.isfile(path):
            raise ConfigError(f"model.chat_template={value!r}: neither a Jinja template (no "
                              "'{') nor an existing file")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return value


MODEL_TYPES = "distalign.model_types"


def register_model_type(path: str) -> None:
    """Register a model type that transformers does not know but a distalign package defines
    (the synthetic world's light reward model), through the ``distalign.model_types`` entry
    point named by the checkpoint's ``model_type``: explicit at every load, so a fresh
    ``distalign eval`` process loads what a training process saved."""
    config = Path(os.path.expanduser(path)) / "config.json"
    if not config.is_file():
        return
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # transformers reports an unreadable config itself
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not model_type or model_type in CONFIG_MAPPING:
        return
    for ep in entry_points(group=MODEL_TYPES):
        if ep.name == model_type:
            ep.load()()


def _from_pretrained(
    auto_cls: Any, path: str, cfg: ModelConfig, what: str, head: str = "new-ok", **extra: Any
) -> Any:
    """Load ``path`` with ``auto_cls``. ``head`` says what a head missing from the checkpoint
    (so randomly initialised) means: "error" (a frozen or generating model would be silently
    wrong), "warn" (a trained head starts from scratch) or "new-ok" (expected: a new RM)."""
    kwargs = _common_kwargs(cfg) | extra | {"output_loading_info": True}
    if cfg.gguf_file and path == cfg.name_or_path:
        kwargs["gguf_file"] = cfg.gguf_file
    path = check_source(path, what)  # a typo fails here, before any hub request
    register_model_type(path)
    try:
        model, info = auto_cls.from_pretrained(path, **kwargs)
    except ImportError as err:
        raise ConfigError(f"loading {what} {path!r} needs an extra package: {err}") from err
    except (OSError, ValueError) as err:
        raise _load_error(what, path, err) from err
    if "gguf_file" in kwargs:
        # transformers dequantises GGUF weights to `dtype` on load but keeps its GGUF quantizer
        # attached, which makes save_pretrained (so final/ and merged LoRA) raise; the model is
        # an ordinary one now, so detach it.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    prefix = getattr(model, "base_model_prefix", "") + "."
    missing = sorted(info.get("missing_keys") or ())
    new_head = [k for k in missing if not k.startswith(prefix)]
    if new_head and head == "error":
        arch = ", ".join(getattr(model.config, "architectures", None) or ["?"])
        raise ConfigError(
            f"{what} {path!r} has no trained {new_head[0].split('.')[0]!r} head (checkpoint "
            f"architecture: {arch}); it would be random. Give a checkpoint of the right kind "
            "(a causal LM for policies, a `distalign train reward` model for scorers)"
        )
    if new_head and head == "warn":
        logger.warning("%s %s: new randomly initialised head %s", what, path, new_head)
    if len(missing) > len(new_head):
        logger.warning("%s %s: %d weights missing from the checkpoint were initialised "
                       "randomly", what, path, len(missing) - len(new_head))
    return model


def apply_lora(model: nn.Module, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap ``model`` in a peft LoRA adapter. For ``task_type="SEQ_CLS"`` peft also trains the
    (newly initialised) score head, via ``modules_to_save``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else "all-linear",
        bias=lora.bias,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:
        raise ConfigError(f"model.lora: {str(err).splitlines()[0]}") from err


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing works with frozen base weights (LoRA) without the
    # enable_input_require_grads() hack that the reentrant variant needs.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # a KV cache is useless (and warned about) in training


def load_causal_lm(path: str, cfg: ModelConfig, what: str) -> nn.Module:
    """A causal LM with its trained LM head (a scorer checkpoint is refused)."""
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, path, cfg, what, "error")


def load_policy(cfg: ModelConfig) -> nn.Module:
    """The trainable policy π: an HF causal LM, LoRA-wrapped when ``cfg.lora.enabled``."""

    if not cfg.name_or_path:
        raise ConfigError("model.name_or_path is empty")
    return _prepare_trainable(load_causal_lm(cfg.name_or_path, cfg, "policy"), cfg, "CAUSAL_LM")


def _prepare_trainable(model: nn.Module, cfg: ModelConfig, task_type: str) -> nn.Module:
    """The policy's memory and regularisation settings on any trained model: dropout off (if
    asked), gradient checkpointing, and a LoRA adapter of ``task_type``."""
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type)
    return model


def load_scorer(
    path: str, cfg: ModelConfig, num_labels: int = 1, pad_token_id: int | None = None,
    head: str = "new-ok", what: str = "scorer",
) -> nn.Module:
    """A reward or value model: ``AutoModelForSequenceClassification`` with ``num_labels`` outputs.

    Loading a *causal LM* checkpoint here keeps its backbone and initialises a new score head:
    that is how a reward model (paper eq. (2), Bradley–Terry) is started from an SFT model.
    ``head="error"`` refuses that (a frozen scorer with a random head scores nothing).
    ``config.pad_token_id`` is set (needed by HF for batched inputs) from ``pad_token_id``,
    else the checkpoint's, else its EOS id. Scores are read with
    :mod:`distalign.lm.scoring`, which never relies on HF's pad-based pooling.
    """
    from transformers import AutoModelForSequenceClassification

    if not path:
        raise ConfigError("scorer path (model.reward_model / model.value_model) is empty")
    model = _from_pretrained(
        AutoModelForSequenceClassification, path, cfg, what, head, num_labels=num_labels
    )
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        eos = model.config.eos_token_id
        pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.config.pad_token_id = pad_token_id
    return model


def trainable_scorer(path: str, cfg: ModelConfig, what: str, head: str) -> nn.Module:
    """A scorer to train (reward model, PPO value model) with the policy's memory settings:
    gradient checkpointing and, when LoRA is on, a SEQ_CLS adapter that also trains the head."""
    return _prepare_trainable(load_scorer(path, cfg, head=head, what=what), cfg, "SEQ_CLS")


def load_reward_model(cfg: ModelConfig, pad_token_id: int | None = None) -> nn.Module:
    """The frozen reward model R̂ of ``cfg.reward_model`` (eval mode, no gradients); a
    checkpoint without a trained score head is refused."""
    if not cfg.reward_model:
        raise ConfigError("model.reward_model is empty but this method scores responses")
    model = load_scorer(cfg.reward_model, cfg, 1, pad_token_id, head="error",
                        what="model.reward_model").eval()
    return model.requires_grad_(False)


def load_value_model(cfg: ModelConfig) -> nn.Module:
    """The trainable PPO value model: ``cfg.value_model``, else initialised from the reward
    model (its head then starts as the reward head, as in common PPO practice)."""
    path = cfg.value_model or cfg.reward_model
    if not path:
        raise ConfigError("PPO needs model.value_model or model.reward_model")
    return trainable_scorer(path, cfg, "model.value_model", head="warn")
