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


def save_final(accelerator: Any, run_dir: Path, trainables: list[nn.Module], tokenizer: Any):
    """``final/`` holds the trained model and tokenizer; a PPO value model goes in
    ``final/value_model``."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = run_dir / "final"
        _export(accelerator.unwrap_model(trainables[0]), final)
        tokenizer.save_pretrained(final)
        if len(trainables) > 1:
            _export(accelerator.unwrap_model(trainables[1]), final / "value_model")
        weights_fingerprint(final)  # cached beside the weights for generate/eval/report
    accelerator.wait_for_everyone()
    return run_dir / "final"
