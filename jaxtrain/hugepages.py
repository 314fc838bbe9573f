"""Transparent huge pages for XLA:CPU's large buffers, via glibc's `glibc.malloc.hugetlb=1`.

XLA:CPU allocates each large temporary buffer of a step afresh with malloc, which glibc serves
with a new mmap; the kernel then faults every 4 KiB page in on first touch. The 35M training
step touches ~1.65 GB this way, ~420,000 page faults per step. Alone on an idle machine that
costs ~1.8 s of kernel time per step; with another large process alive (a PyTorch peer, a data
worker, a notebook kernel) we measured it at ~5 s and the step 12-25% slower
(docs/benchmarks.md). With the tunable, glibc asks for transparent huge pages
(`madvise(MADV_HUGEPAGE)`) on those mappings: 2 MiB pages, ~2,000 faults per step, and memory is
still returned to the system when a buffer is freed (peak RSS unchanged).

glibc reads tunables only when a process starts, so the `jaxtrain` command re-executes itself
once with the tunable added (`reexec_with_hugepages`); Python API users who want it start Python
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. `JAXTRAIN_HUGEPAGES=0` turns it off. Linux with
glibc >= 2.35 only; elsewhere nothing changes (older glibc ignores unknown tunables).
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


def env_with_hugepages(env):
  """A copy of `env` with the tunable appended to GLIBC_TUNABLES (kept if already there)."""
  env = dict(env)
  current = env.get("GLIBC_TUNABLES", "")
  entries = [item for item in current.split(":") if item]
  if not any(item.startswith("glibc.malloc.hugetlb=") for item in entries):
    entries.append(TUNABLE)
  env["GLIBC_TUNABLES"] = ":".join(entries)
  return env


def wanted(env=None):
  """True when a process started with `env` should get the tunable and does not have it yet."""
  env = os.environ if env is None else env
  if env.get(OPT_OUT, "1") == "0" or not _glibc_has_tunable():
    return False
  return env_with_hugepages(env).get("GLIBC_TUNABLES") != env.get("GLIBC_TUNABLES")


def reexec_with_hugepages(interpreter_args):
  """Replace this process by `python INTERPRETER_ARGS...` with the tunable set, if wanted.

  Returns only when nothing needs doing (tunable already set, opted out, not glibc).
  """
  if not wanted() or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *interpreter_args], env_with_hugepages(os.environ))
