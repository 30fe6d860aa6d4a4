"""Evaluation: aggregation of run directories into report tables (``report``).

The exact metrics of the synthetic world live in ``distalign.synthetic.metrics``.
"""

from distalign.eval.report import aggregate, find_runs, load_run, markdown, report

__all__ = ["aggregate", "find_runs", "load_run", "markdown", "report"]
