"""Pairwise judges for win-rates against a reference (see :mod:`distalign.eval.judges.base`)."""

from distalign.eval.judges.base import Judge, Pair, Verdict, load_template
from distalign.eval.judges.factory import make_judge

__all__ = ["Judge", "Pair", "Verdict", "load_template", "make_judge"]
