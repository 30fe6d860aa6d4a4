"""A fingerprint of model weights on disk: what generations and evaluations record, so that a
file made by other weights (a retrained or extended run) is never taken for this model's.

The fingerprint is the sha256 of the weight files' names and bytes (safetensors, bin, a named
GGUF; a LoRA run's ``final/adapter`` included), not of the path: the path stays when a run is
trained again. Hashing a 135M-parameter fp32 model takes about a second, so the digest is cached
in ``.fingerprint.json`` beside the weights, valid while every file keeps its size and mtime.
A hub id cannot be read here and is fingerprinted by its name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE = ".fingerprint.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_CHUNK = 1 << 22


def _weight_files(model_dir: Path, gguf_file: str | None) -> list[Path]:
    if gguf_file:
        return [model_dir / gguf_file]
    return sorted(p for p in model_dir.rglob("*")
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p.suffix != ".gguf")


def _stamp(files: list[Path], root: Path) -> dict[str, list[int]]:
    return {str(p.relative_to(root)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def weights_fingerprint(model: str | Path, gguf_file: str | None = None) -> str:
    """``sha256:<hex>`` of the weights in ``model`` (a model directory), or ``hub:<id>`` when
    ``model`` is not a local directory."""
    root = Path(model)
    if not root.is_dir():
        return f"hub:{model}" + (f"@{gguf_file}" if gguf_file else "")
    files = _weight_files(root, gguf_file)
    stamp = _stamp(files, root)
    cache = root / (f".{gguf_file}{CACHE}" if gguf_file else CACHE)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return str(cached["fingerprint"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = hashlib.sha256()
    for path, rel in zip(files, stamp, strict=True):
        digest.update(rel.encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
    fingerprint = f"sha256:{digest.hexdigest()}"
    try:  # a read-only model directory just goes uncached
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "files": stamp}) + "\n")
        os.replace(tmp, cache)
    except OSError:
        pass
    return fingerprint


def short(fingerprint: str | None) -> str:
    """The first 12 hex digits, for messages."""
    if not fingerprint:
        return "none"
    kind, _, value = fingerprint.partition(":")
    return value[:12] if kind == "sha256" else fingerprint
