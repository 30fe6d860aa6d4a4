"""The toy's reference engine, in torch: it solves the problems of :mod:`distalign.tabular.fast`
by calling the library's own losses (``distalign.objectives``, the ones the LM methods train
with; closed-form derivatives are checked against autograd through them), so the tabular
results are those of the library's definitions. It runs on any device (``--engine torch``,
``--device cuda``), and the numpy engine is tested against it.

- :mod:`.pairwise`: the pairwise objectives, their values, gradients and Hessians;
- :mod:`.newton`: batched damped Newton (the rules of :mod:`distalign.tabular.rules`);
- :mod:`.solvers`: the six methods' solvers;
- :mod:`.experiment`: the experiment on this engine.
"""
