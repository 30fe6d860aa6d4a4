"""The toy's default engine: numpy on the CPU, without importing torch.

- :mod:`.engine`: the experiment (world, data, the six methods, β selection);
- :mod:`.newton`: batched damped Newton in numpy;
- :mod:`.compiled`: the same Newton in C (``_newton.c``, ``_abs_step.c``, their interface
  ``_newton.h``), called through ctypes where the extension was built;
- :mod:`.certificate`: when one Newton start is provably enough.

Its results equal those of the torch reference (:mod:`distalign.tabular.reference`) to 1e-6;
``tests/test_tabular_fast.py`` and ``tests/test_tabular_reference.py`` hold it there.
"""
