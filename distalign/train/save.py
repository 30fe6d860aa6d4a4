"""Writing ``final/``: weights loadable by plain transformers (LoRA merged in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from distalign.lm.fingerprint import weights_fingerprint


def _export(model: nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # peft: keep the adapter, then merge for plain HF
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)


def save_final(accelerator: Any, run_dir: Path, models: list[nn.Module] | None, tokenizer: Any):
    """``final/`` holds the trained model and tokenizer; a PPO value model goes in
    ``final/value_model``. ``models`` are the trained models as plain (unwrapped, unsharded)
    modules on the main process, None on the others (``train/sharding.py``: plain_copies)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        assert models, "the main process needs the trained models"
        final = run_dir / "final"
        _export(models[0], final)
        tokenizer.save_pretrained(final)
        if len(models) > 1:
            _export(models[1], final / "value_model")
        weights_fingerprint(final)  # cached beside the weights for generate/eval/report
    accelerator.wait_for_everyone()
    return run_dir / "final"
