"""malloc for XLA:CPU: transparent huge pages, and the step's temporary block kept between steps.

XLA:CPU allocates the whole temporary space of one execution as a single block (for the 35M
training step 1.43 GB; see `compiled.memory_analysis().temp_size_in_bytes`) and frees it when
the execution ends. glibc serves a block that large with a fresh mmap and unmaps it on free, so
every step the kernel faults the block in again, zero-filling it page by page (~350,000 faults of
4 KiB for 1.43 GB). The `jaxtrain` command therefore restarts itself once, before JAX is imported,
with two additions to its environment:

- `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: glibc asks for 2 MiB transparent huge pages
  (`madvise(MADV_HUGEPAGE)`) on its large mappings: ~1,000 faults per step instead of ~350,000.
  Needs glibc >= 2.35. `JAXTRAIN_HUGEPAGES=0` leaves it out; a hugetlb value the user set is kept.
- `LD_PRELOAD=<jaxtrain/_block_cache*.so>`: a small C library (jaxtrain/csrc/block_cache.c,
  built when the package is installed, if a C compiler is there) that keeps freed blocks of
  >= 64 MiB mapped and hands the same pages to the next request of the same size: no page faults
  and no kernel zero-filling after the first step, peak RSS unchanged (between steps the process
  keeps what it held at the step's peak). `JAXTRAIN_BLOCK_CACHE=0` leaves it out, and so does an
  LD_PRELOAD the user set already (another allocator, say).

Both are read only when a process starts, hence the restart (`reexec`), which keeps the
interpreter options and arguments. Python API users who want the same start Python with the
environment that `env_for_xla_cpu(os.environ)` returns (`python -m jaxtrain.host_malloc` prints
it). Linux with glibc >= 2.35 only; elsewhere nothing changes. Measurements: docs/benchmarks.md.
"""

import importlib.machinery
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
HUGEPAGES_OPT_OUT = "JAXTRAIN_HUGEPAGES"
BLOCK_CACHE_OPT_OUT = "JAXTRAIN_BLOCK_CACHE"


def _glibc_supported():
  if sys.platform != "linux":
    return False
  name, version = platform.libc_ver()
  if name != "glibc":
    return False
  try:
    major, minor = (int(part) for part in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def built_library(stem):
  """Path of jaxtrain's compiled library `stem` (setup.py's extensions), or None where the install
  could not build it (no compiler). Shared with jaxtrain/cpu_gemm.py; this module imports no JAX."""
  here = os.path.dirname(os.path.abspath(__file__))
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = os.path.join(here, stem + suffix)
    if os.path.isfile(path):
      return path
  return None


def block_cache_library():
  """Path of the built block-cache library, or None (not built: no C compiler at install)."""
  return built_library("_block_cache")


def preloads_block_cache(env):
  """True when `env`'s LD_PRELOAD is the built block-cache library (never where it is not built)."""
  library = block_cache_library()
  return library is not None and env.get("LD_PRELOAD") == library


def _tunables(env):
  return [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item]


def env_for_xla_cpu(env):
  """A copy of `env` with the huge-page tunable and the block-cache preload added, each unless
  opted out, already there (a user's own hugetlb value counts) or unsupported here."""
  env = dict(env)
  if not _glibc_supported():
    return env
  tunables = _tunables(env)
  if env.get(HUGEPAGES_OPT_OUT, "1") != "0" and not any(
      item.startswith("glibc.malloc.hugetlb=") for item in tunables):
    env["GLIBC_TUNABLES"] = ":".join(tunables + [TUNABLE])
  # Only into an empty LD_PRELOAD: the library hands every pointer it does not own to glibc's
  # free, which would be wrong for another preloaded allocator's (jemalloc, mimalloc, ...).
  library = block_cache_library()
  if env.get(BLOCK_CACHE_OPT_OUT, "1") != "0" and library and not env.get("LD_PRELOAD", "").strip():
    env["LD_PRELOAD"] = library
  return env


def env_without_additions(env):
  """A copy of `env` without what `env_for_xla_cpu` adds (this tunable, this library), for a
  child process that must run with plain glibc whatever its parent was started with."""
  env = dict(env)
  tunables = [item for item in _tunables(env) if item != TUNABLE]
  if tunables:
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  else:
    env.pop("GLIBC_TUNABLES", None)
  if preloads_block_cache(env):
    del env["LD_PRELOAD"]
  return env


def wanted(env=None):
  """True when a process started with `env` lacks something `env_for_xla_cpu` would add."""
  env = os.environ if env is None else env
  return env_for_xla_cpu(env) != dict(env)


def reexec():
  """Run this process's own command line (`sys.orig_argv`) again with `env_for_xla_cpu`, if
  wanted. Returns only when nothing needs doing."""
  if not wanted() or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env_for_xla_cpu(os.environ))


if __name__ == "__main__":
  _added = {k: v for k, v in env_for_xla_cpu(os.environ).items() if os.environ.get(k) != v}
  print(" ".join(f"{k}={v}" for k, v in sorted(_added.items())))
