"""Differences between the transformers versions distalign supports (pyproject.toml).

transformers takes a 2-D boolean ``logits_to_keep`` (which positions of each row get logits)
from 5.20 on; GPU images often ship 5.17, whose models index ``hidden[:, keep]`` and raise.
:func:`kept_logits` asks for the kept positions only and, where a model class cannot, computes
full logits and keeps the same positions: the same ``[N, V]`` either way.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

log = logging.getLogger("distalign")
_FULL_LOGITS: set[str] = set()  # model classes whose forward rejected a 2-D logits_to_keep


def kept_logits(model: nn.Module, keep: Tensor, **inputs: Any) -> Tensor:
    """Logits at the positions where ``keep [B, L]`` is True, flattened to ``[N, V]`` in
    row-major order (``logits[keep]``). ``inputs`` are the model's forward arguments."""
    name = type(model).__name__
    if name not in _FULL_LOGITS:
        try:
            return model(**inputs, logits_to_keep=keep).logits
        except (TypeError, IndexError) as err:  # 5.17 indexes hidden[:, keep]: IndexError
            _FULL_LOGITS.add(name)  # one failed forward per model class, not per call
            log.warning("%s does not take a 2-D logits_to_keep (transformers < 5.20: %s); "
                        "computing full logits (slower, same values)", name,
                        type(err).__name__)
    return model(**inputs).logits[keep]
