"""Transparent huge pages for XLA:CPU's large buffers, via glibc's `glibc.malloc.hugetlb=1`.

XLA:CPU allocates a step's whole temporary space afresh, one malloc per execution (for the 35M
training step a block of 1.43 GB; 1.72 GB before the RMSNorm VJP; see
`compiled.memory_analysis().temp_size_in_bytes`). glibc serves it with a new mmap, and the kernel
faults every 4 KiB page in on first touch: ~420,000 page faults per step at 1.72 GB. Alone on an
idle machine that costs ~1.8 s of kernel time per step; with another large process alive (in our
measurement an idle PyTorch worker) it was ~5 s and the step 19-38% slower (docs/benchmarks.md).
With the tunable, glibc asks for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on those
mappings: 2 MiB pages, ~2,000 faults per step, and memory is still returned to the system when a
buffer is freed (peak RSS unchanged). In a 12-step `jaxtrain train` run: less kernel time (25 s vs
32-35 s), a slightly lower peak RSS and the same speed within noise. glibc's keep-the-heap
tunables were not robust and mimalloc was either slower or used far more memory there
(docs/benchmarks.md).

glibc reads tunables only when a process starts, so the `jaxtrain` command re-executes its own
command line once with the tunable added (`reexec_with_hugepages`); Python API users who want it
start Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. `JAXTRAIN_HUGEPAGES=0` turns it off,
and a hugetlb value the user set in GLIBC_TUNABLES is kept. Linux with glibc >= 2.35 only
(the first glibc with the tunable); elsewhere nothing changes.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXTRAIN_HUGEPAGES"


def _glibc_has_tunable():
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


def _tunables(env):
  return [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item]


def _hugetlb_set(env):
  return any(item.startswith("glibc.malloc.hugetlb=") for item in _tunables(env))


def env_with_hugepages(env):
  """A copy of `env` with the tunable appended to GLIBC_TUNABLES (a hugetlb value already there
  is kept)."""
  env = dict(env)
  if not _hugetlb_set(env):
    env["GLIBC_TUNABLES"] = ":".join(_tunables(env) + [TUNABLE])
  return env


def wanted(env=None):
  """True when a process started with `env` should get the tunable and does not have it yet."""
  env = os.environ if env is None else env
  return env.get(OPT_OUT, "1") != "0" and _glibc_has_tunable() and not _hugetlb_set(env)


def reexec_with_hugepages():
  """Run this process's own command line (`sys.orig_argv`) again with the tunable set, if wanted.

  Interpreter options (`-X`, `-W`, ...) and arguments are kept. Returns only when nothing needs
  doing (tunable already set, opted out, not glibc >= 2.35).
  """
  if not wanted() or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env_with_hugepages(os.environ))
