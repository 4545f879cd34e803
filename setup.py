"""Builds the stats engine's C kernel (app/stats/_kernel.c); everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "app.stats._kernel",
            ["app/stats/_kernel.c"],
            extra_compile_args=["-O3", "-fopenmp-simd", "-fno-math-errno"],
        )
    ]
)
