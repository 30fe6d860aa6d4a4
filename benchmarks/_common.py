"""Helpers shared by the benchmark scripts (not part of the library).

Benchmarks run each trainer in its own child process so that peak memory is measured per
trainer; these helpers pin threads, quieten libraries and read memory in that child.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def pin_threads(threads: int) -> dict[str, str]:
    """Environment for a child process with ``threads`` intra-op threads everywhere.

    Set before torch is imported so OpenMP/MKL pick it up; ``torch.set_num_threads`` is called
    again in the child (:func:`child_setup`) because some libraries reset it.
    """
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TQDM_DISABLE="1",
        PYTHONWARNINGS="ignore",
    )
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def child_setup(threads: int) -> None:
    """Pin torch threads and silence per-load progress bars in a benchmark child."""
    import torch

    torch.set_num_threads(threads)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Current resident set size (Linux ``/proc``; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mib()
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def versions() -> dict[str, str]:
    """Versions of the libraries a benchmark result depends on."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "peft", "datasets", "trl", "distalign"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def run_child(script: str, v: str, work: Path, env: dict[str, str], alt: str | None) -> dict:
    """Run variant ``v`` of ``script`` in its own process (``@alt``: distalign imported from
    the other checkout ``alt``) and return the JSON of its ``RESULT`` line."""
    if v.endswith("@alt"):
        env = env | {"PYTHONPATH": os.pathsep.join([alt or "", env["PYTHONPATH"]])}
    cmd = [sys.executable, script, "--child", v, "--workdir", str(Path(work).resolve())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          cwd=Path(script).parent)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"variant {v!r} failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT ") :])
