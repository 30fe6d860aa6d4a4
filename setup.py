"""Build the toy's compiled Newton solver (tabular/_newton.c); metadata is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the toy uses
numpy's solver (the same steps, about 2x slower).
"""

import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "distalign.tabular._newton",
    ["distalign/tabular/_newton.c", "distalign/tabular/_abs_step.c"], optional=True,
    extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
)])
