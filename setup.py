"""Builds the stats engine's optional C kernel (ckptscope/stats/_kernel.c); the rest is in pyproject.toml.

The kernel is optional: where no C compiler is found (or ``CKPTSCOPE_BUILD_KERNEL=0``), the
install still succeeds and ckptscope computes stats with its torch-op engine (same definitions,
about half the speed). The sha256 of the source is compiled in, so an editable install whose
``_kernel.c`` was edited after the build is noticed at import and not used (``pip install -e .``
again rebuilds it).
"""

import hashlib
import os
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "ckptscope/stats/_kernel.c"
source_sha = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()
build_kernel = os.environ.get("CKPTSCOPE_BUILD_KERNEL", "1") != "0"

setup(
    ext_modules=[
        Extension(
            "ckptscope.stats._kernel",
            [SOURCE],
            extra_compile_args=["-O3", "-fopenmp-simd", "-fno-math-errno"],
            define_macros=[("CKPTSCOPE_KERNEL_SOURCE_SHA256", f'"{source_sha}"')],
            optional=True,
        )
    ]
    if build_kernel
    else []
)
