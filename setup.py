"""Build the toy's compiled Newton solver (tabular/fast/_newton.c); metadata is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the toy uses
numpy's solver (the same steps, about 2x slower). Newton's constants are not compiled in: the
solver receives them from distalign/tabular/rules.py on every call.
"""

import sys

from setuptools import Extension, setup

HERE = "distalign/tabular/fast"

setup(ext_modules=[Extension(
    "distalign.tabular.fast._newton",
    [f"{HERE}/_newton.c", f"{HERE}/_abs_step.c"],
    depends=[f"{HERE}/_newton.h"],  # a changed header rebuilds (and ships in the sdist)
    include_dirs=[HERE],
    optional=True,
    extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
)])
