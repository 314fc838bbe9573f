"""The compiled parts (everything else is in pyproject.toml). Both are optional: without a
compiler (or without jaxlib's FFI headers at build time) the install goes on without them, and
jaxtrain falls back to what XLA does by itself.

- jaxtrain/csrc/block_cache.c: not a Python module but a plain C library that the `jaxtrain`
  command preloads (LD_PRELOAD) to keep XLA:CPU's per-step temporary block mapped
  (jaxtrain/host_malloc.py).
- jaxtrain/csrc/cpu_gemm.cc: an XLA FFI handler that runs fp32 matrix products through OpenBLAS
  on CPU (jaxtrain/cpu_gemm.py). It includes jaxlib's FFI headers, hence jaxlib in the build
  requirements (pyproject.toml pins the oldest jaxlib we support there: its headers fit every
  newer jaxlib, while a handler built against newer headers than the runtime's is refused).
"""

import os

from setuptools import Extension, setup


def _ffi_include_dirs():
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return []
  include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  return [include] if os.path.isfile(os.path.join(include, "xla", "ffi", "api", "ffi.h")) else []


extensions = [Extension("jaxtrain._block_cache", ["jaxtrain/csrc/block_cache.c"],
                        extra_compile_args=["-O2", "-Wall"], optional=True)]
ffi_include_dirs = _ffi_include_dirs()
if ffi_include_dirs:
  extensions.append(Extension("jaxtrain._cpu_gemm", ["jaxtrain/csrc/cpu_gemm.cc"],
                              include_dirs=ffi_include_dirs, language="c++",
                              extra_compile_args=["-O2", "-std=c++17", "-Wno-attributes"],
                              optional=True))
setup(ext_modules=extensions)
