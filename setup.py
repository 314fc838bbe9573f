"""The one compiled part: jaxtrain/csrc/block_cache.c (everything else is in pyproject.toml).

Not a Python module: a plain C library that the `jaxtrain` command preloads (LD_PRELOAD) to keep
XLA:CPU's per-step temporary block mapped (jaxtrain/host_malloc.py). Optional: without a C
compiler the install goes on without it, and nothing else changes.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("jaxtrain._block_cache", ["jaxtrain/csrc/block_cache.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
