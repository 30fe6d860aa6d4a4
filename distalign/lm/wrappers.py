"""Seeing through model wrappers (DDP, DeepSpeed, ``torch.compile``) and switching modes.

``eval_mode`` is the one place that turns dropout off for a forward pass that must be
deterministic (sampling, π₀, PPO's old log-probs and values) and restores each module's mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

# Wrappers whose `.module` is the full model. FSDP is deliberately absent: its `.module` holds
# sharded parameters, so it must be called through the wrapper.
_PARALLEL_WRAPPERS = {"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"}


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel/DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``).

    A peft ``PeftModel`` is *not* stripped: it is the model (its adapter state matters).
    """
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in _PARALLEL_WRAPPERS:
            model = model.module
        else:
            return model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the core importable without it
        return False
    return isinstance(model, PeftModel)


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put ``models`` (None entries ignored) in eval mode; restore every submodule's own mode
    on exit (a frozen part may be in eval mode inside a training model)."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (``nn.Dropout`` modules and the attention-dropout
    floats HF attention layers read), so train-mode forwards are deterministic: PPO's first
    ratio is then exactly 1 and log-prob ratios are not dropout noise. TRL does the same."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop",
                "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
