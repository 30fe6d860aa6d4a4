"""Build the toy's compiled Newton solver (tabular/fast/_newton.c); metadata is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the toy uses
numpy's solver (the same steps, about 2x slower).
"""

import sys

from setuptools import Extension, setup

HERE = "distalign/tabular/fast"

setup(ext_modules=[Extension(
    "distalign.tabular.fast._newton",
    [f"{HERE}/_newton.c", f"{HERE}/_abs_step.c"],
    optional=True,
    extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
)])
