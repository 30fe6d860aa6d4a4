"""Measuring trained policies: ``generate`` (prompts → samples, resumable, AlpacaEval
``model_outputs``), ``evaluate`` (RM score, KL(π‖π₀) estimators, judge win-rates), judges
behind one interface (``judges/``; worlds add oracle judges through the ``distalign.oracles``
entry points, so eval imports no world), annotations in AlpacaEval's schema, and ``report``
(run and eval directories → tables, mean ± std over seeds). The package namespace re-exports
the report functions only.
"""

from distalign.eval.report import aggregate, find_runs, load_run, markdown, report

__all__ = ["aggregate", "find_runs", "load_run", "markdown", "report"]
