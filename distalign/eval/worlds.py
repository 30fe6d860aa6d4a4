"""What eval asks of a world with a known π*: its oracle judge's measures of a policy.

Eval knows no world: an oracle judge that can measure a policy (the tilted world's) has a
``measure`` method, called here with the policy's and π₀'s generations on the same prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distalign.errors import ConfigError
from distalign.eval.genfile import read_generations as read_rows
from distalign.eval.genfile import sidecar_path


def world_measures(judge: Any, rows: list[dict[str, Any]], meta: dict[str, Any],
                   base_generations: str | Path, policy_model: str | None) -> dict[str, Any]:
    """The measures a world's oracle makes of a policy against π₀'s samples (the judge's own
    ``measure``; eval knows no world)."""
    if not hasattr(judge, "measure"):
        raise ConfigError(f"--base-generations: the judge {judge.id} measures no policy (only "
                          "the oracle of a world with a known π*, such as a tilted world, does)")
    base_rows, base_meta = _read(Path(base_generations))
    metrics = judge.measure(rows, base_rows, policy_model=policy_model or meta.get("model_path"),
                            meta=meta, base_meta=base_meta)
    return {"metrics": metrics, "world_measures": {"judge": judge.id,
                                                   "base_generations": str(base_generations)}}



def _read(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import json

    meta = sidecar_path(path)
    return read_rows(path), (json.loads(meta.read_text()) if meta.is_file() else {})
