"""The `jaxtrain` command restarts itself once with huge pages and the block cache
(jaxtrain/host_malloc.py); the block cache (jaxtrain/csrc/block_cache.c) reuses large blocks."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from jaxtrain import host_malloc

supported = host_malloc._glibc_supported()  # pylint: disable=protected-access
needs_glibc = pytest.mark.skipif(not supported, reason="needs Linux with glibc >= 2.35")
LIBRARY = host_malloc.block_cache_library()
needs_library = pytest.mark.skipif(LIBRARY is None or not supported,
                                   reason="block cache not built (no C compiler at install)")
OURS = ("GLIBC_TUNABLES", "LD_PRELOAD", "JAXTRAIN_HUGEPAGES", "JAXTRAIN_BLOCK_CACHE")


@needs_glibc
def test_the_block_cache_is_built_where_a_compiler_is():
  if shutil.which("cc") or shutil.which("gcc"):
    assert LIBRARY is not None, "pip install -e . should have built jaxtrain/_block_cache*.so"


@needs_glibc
def test_env_gets_each_addition_once_and_keeps_what_was_there():
  env = host_malloc.env_for_xla_cpu({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert env["X"] == "1"
  assert env.get("LD_PRELOAD") == LIBRARY
  assert host_malloc.env_for_xla_cpu(env) == env
  assert not host_malloc.wanted(env)
  assert host_malloc.env_for_xla_cpu({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  # Another preloaded allocator: the block cache stays out (its free() would get that one's
  # pointers); the tunable is still added.
  other = host_malloc.env_for_xla_cpu({"LD_PRELOAD": "/opt/libjemalloc.so"})
  assert other == {"LD_PRELOAD": "/opt/libjemalloc.so", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@needs_glibc
def test_env_without_additions_undoes_them_and_keeps_the_rest():
  start = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}
  assert host_malloc.env_without_additions(host_malloc.env_for_xla_cpu(start)) == start
  assert host_malloc.env_without_additions(host_malloc.env_for_xla_cpu({})) == {}
  # Not ours: a user's hugetlb value and another preloaded library stay.
  theirs = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "LD_PRELOAD": "/opt/libjemalloc.so"}
  assert host_malloc.env_without_additions(theirs) == theirs


def test_without_a_built_block_cache_nothing_is_taken_for_it(monkeypatch):
  """Where no C compiler built the library, no LD_PRELOAD (or its absence) counts as ours."""
  monkeypatch.setattr(host_malloc, "block_cache_library", lambda: None)
  assert not host_malloc.preloads_block_cache({})
  assert host_malloc.env_without_additions({"X": "1"}) == {"X": "1"}
  theirs = {"LD_PRELOAD": "/opt/libjemalloc.so"}
  assert host_malloc.env_without_additions(theirs) == theirs


@needs_glibc
def test_a_users_own_hugetlb_setting_and_the_opt_outs_are_respected():
  mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "JAXTRAIN_BLOCK_CACHE": "0"}
  assert host_malloc.env_for_xla_cpu(mine) == mine
  assert not host_malloc.wanted(mine)
  assert not host_malloc.wanted({"JAXTRAIN_HUGEPAGES": "0", "JAXTRAIN_BLOCK_CACHE": "0"})
  only_cache = host_malloc.env_for_xla_cpu({"JAXTRAIN_HUGEPAGES": "0"})
  assert "GLIBC_TUNABLES" not in only_cache
  assert ("LD_PRELOAD" in only_cache) == (LIBRARY is not None)


def _run(code, *args, **extra_env):
  env = {k: v for k, v in os.environ.items() if k not in OURS}
  env.update(extra_env)
  return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                        text=True, timeout=120, check=True).stdout


@needs_library
def test_reexec_runs_the_same_command_line_again_with_both():
  code = ("import os, sys; from jaxtrain import host_malloc; host_malloc.reexec(); "
          "print(os.environ.get('GLIBC_TUNABLES'), os.environ.get('LD_PRELOAD'), sys.argv[1:])")
  # Printed once, by the restarted process, with its arguments intact.
  assert _run(code, "a", "b").splitlines() == [f"glibc.malloc.hugetlb=1 {LIBRARY} ['a', 'b']"]
  assert _run(code, "a", JAXTRAIN_HUGEPAGES="0", JAXTRAIN_BLOCK_CACHE="0").splitlines() == [
      "None None ['a']"]


@needs_library
def test_only_the_jaxtrain_program_restarts_and_then_runs_normally():
  cli_run = ("import os, sys; sys.argv = [{name!r}, '--help']; "
             "print('preload', os.environ.get('LD_PRELOAD')); "
             "from jaxtrain import cli; sys.exit(cli.main())")
  out = _run(cli_run.format(name="/venv/bin/jaxtrain"))
  # The first process printed None, then exec'd; the second has the library and runs --help once.
  assert out.count("preload None") == 1 and out.count(f"preload {LIBRARY}") == 1
  assert out.count("Exit codes") == 1
  # Something else calling main() (a notebook kernel, say) is never replaced.
  out = _run(cli_run.format(name="ipykernel_launcher.py"))
  assert out.count("preload None") == 1 and "_block_cache" not in out
  assert out.count("Exit codes") == 1


@needs_library
def test_the_module_prints_the_environment_for_python_api_users():
  # docs/training.md: `env $(python -m jaxtrain.host_malloc) python my_script.py`.
  env = {k: v for k, v in os.environ.items() if k not in OURS}
  out = subprocess.run([sys.executable, "-m", "jaxtrain.host_malloc"], env=env,
                       capture_output=True, text=True, timeout=60, check=True).stdout
  assert out.split() == ["GLIBC_TUNABLES=glibc.malloc.hugetlb=1", f"LD_PRELOAD={LIBRARY}"]


# Runs under LD_PRELOAD=<library>: posix_memalign and free from ctypes resolve to the library's.
BLOCKS = textwrap.dedent("""
    import ctypes, resource, threading, time
    libc = ctypes.CDLL(None)
    size_t = ctypes.c_size_t
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), size_t, size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.realloc.argtypes = [ctypes.c_void_p, size_t]
    libc.realloc.restype = ctypes.c_void_p
    libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
    libc.malloc_usable_size.restype = ctypes.c_size_t
    MiB = 1 << 20

    def alloc(size):
      p = ctypes.c_void_p()
      assert libc.posix_memalign(ctypes.byref(p), 64, size) == 0
      return p.value

    def resident():
      return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    a = alloc(100 * MiB)
    assert a % (2 * MiB) == 0 and libc.malloc_usable_size(a) >= 100 * MiB
    ctypes.memset(a, 7, 100 * MiB)
    libc.free(a)
    b = alloc(100 * MiB)
    assert b == a, "a freed block of the same size is handed out again"
    assert ctypes.string_at(a + 50 * MiB, 4) == bytes([7] * 4), "same pages, not refaulted"

    # While it is in use the next request of that size waits for it (a step's temporary is
    # freed a few ms after the next step asks), up to a bound, then maps a second block.
    threading.Thread(target=lambda: (time.sleep(0.005), libc.free(b))).start()
    c = alloc(100 * MiB)
    t = time.perf_counter()
    d = alloc(100 * MiB)
    waited = time.perf_counter() - t
    assert d != c and waited < 1.0
    print("waited-for block reused:", c == a)

    # One block per size is kept: d, freed while c (same size) exists, is unmapped at once.
    ctypes.memset(d, 1, 100 * MiB)
    before = resident()
    libc.free(d)
    assert resident() < before - 90 * MiB
    libc.free(c)
    assert alloc(100 * MiB) == c
    libc.free(c)

    # A size no idle block has: the idle blocks of other sizes are unmapped first (block a, with
    # its 100 MiB written, leaves the resident set).
    before = resident()
    e = alloc(80 * MiB)
    assert resident() < before - 90 * MiB

    # realloc moves the contents to glibc memory and releases the block.
    ctypes.memset(e, 3, 16)
    f = libc.realloc(e, 32)
    assert f != e and ctypes.string_at(f, 16) == bytes([3] * 16)
    libc.free(f)
    assert alloc(80 * MiB) == e

    # Small requests pass through (to glibc) and free without error.
    g = alloc(1 * MiB)
    libc.free(g)
    print("ok")
""")


@needs_library
def test_the_block_cache_hands_the_same_block_to_the_next_request():
  for _ in range(3):  # the waiting check depends on a 5 ms sleep beating a 50 ms bound
    out = _run(BLOCKS, LD_PRELOAD=LIBRARY).splitlines()
    assert out[-1] == "ok"
    if out[0] == "waited-for block reused: True":
      break
  assert out[0] == "waited-for block reused: True"


XLA_TEMP = textwrap.dedent("""
    import resource, jax, jax.numpy as jnp
    x = jnp.ones((4096, 5000), jnp.float32)
    w = jnp.ones((5000, 8), jnp.float32)
    f = jax.jit(lambda x, w: jnp.sin(x) @ w).lower(x, w).compile()
    assert f.memory_analysis().temp_size_in_bytes > 64 << 20
    faults = []
    for _ in range(3):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x, w).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
""")


@needs_library
def test_xla_reuses_its_temporary_block_without_page_faults():
  # An execution with a 78 MiB temporary block: glibc alone faults ~20,000 4 KiB pages per call.
  faults = [int(n) for n in _run(XLA_TEMP, LD_PRELOAD=LIBRARY).split()]
  assert max(faults[1:]) < 2000, faults
