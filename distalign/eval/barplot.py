"""The report's figure (``distalign report --plot`` and the pipeline's ``report.png``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot(rows: Sequence[Any], metrics: list[str], path: str | Path,
         titles: list[str] | None = None) -> Path:
    """One horizontal bar chart per metric: mean with ± std error bars, one bar per row of
    :func:`distalign.eval.report.aggregate` (its ``label`` and ``stats``). The row labels sit
    once, on the left (shared y axis), so long labels never run into the next panel;
    constrained layout sizes the margins to them (tight_layout warned and gave up)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["\n".join(textwrap.wrap(r.label, 28)) or "–" for r in rows]
    titles = ["\n".join(textwrap.wrap(t, 22)) for t in (titles or metrics)]
    label_width = 0.075 * max((len(line) for lb in labels for line in lb.split("\n")), default=4)
    height = 1.3 + 0.32 * sum(lb.count("\n") + 1 for lb in labels)
    fig, axes = plt.subplots(1, len(metrics), sharey=True, squeeze=False, layout="constrained",
                             figsize=(2.6 * len(metrics) + label_width + 0.4, max(height, 2.4)))
    y = list(range(len(rows)))
    for ax, m, title in zip(axes[0], metrics, titles, strict=True):
        mu = [r.stats.get(m, (math.nan, 0.0, 0))[0] for r in rows]
        sd = [r.stats.get(m, (math.nan, 0.0, 0))[1] for r in rows]
        ax.barh(y, mu, xerr=sd, capsize=3, color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.axvline(0, color="gray", lw=0.6)
    axes[0][0].set_yticks(y, labels, fontsize=8)
    axes[0][0].invert_yaxis()  # the table's first row on top
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
