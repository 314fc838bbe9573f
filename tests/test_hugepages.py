"""The `jaxtrain` command restarts itself once with glibc's huge-page tunable (jaxtrain/hugepages.py)."""

import os
import subprocess
import sys

import pytest

from jaxtrain import hugepages

needs_tunable = pytest.mark.skipif(not hugepages._glibc_has_tunable(),  # pylint: disable=protected-access
                                   reason="needs Linux with glibc >= 2.35")


def test_env_gets_the_tunable_once_and_keeps_other_tunables():
  env = hugepages.env_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert env["X"] == "1"
  assert hugepages.env_with_hugepages(env) == env
  assert hugepages.env_with_hugepages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_a_users_own_hugetlb_setting_and_the_opt_out_are_respected():
  mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
  assert hugepages.env_with_hugepages(mine) == mine
  assert not hugepages.wanted(mine)
  assert not hugepages.wanted({"JAXTRAIN_HUGEPAGES": "0"})


def _run(code, *args, **extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXTRAIN_HUGEPAGES")}
  env.update(extra_env)
  return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                        text=True, timeout=120, check=True).stdout


@needs_tunable
def test_reexec_runs_the_same_command_line_again_with_the_tunable():
  code = ("import os, sys; from jaxtrain import hugepages; hugepages.reexec_with_hugepages(); "
          "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
  # Printed once, by the restarted process, with its arguments intact.
  assert _run(code, "a", "b").splitlines() == ["glibc.malloc.hugetlb=1 ['a', 'b']"]
  assert _run(code, "a", JAXTRAIN_HUGEPAGES="0").splitlines() == ["None ['a']"]


@needs_tunable
def test_only_the_jaxtrain_program_restarts_and_then_runs_normally():
  cli_run = ("import os, sys; sys.argv = [{name!r}, '--help']; "
             "print('tunables', os.environ.get('GLIBC_TUNABLES')); "
             "from jaxtrain import cli; sys.exit(cli.main())")
  out = _run(cli_run.format(name="/venv/bin/jaxtrain"))
  # The first process printed None, then exec'd; the second has the tunable and runs --help once.
  assert out.count("tunables None") == 1 and out.count("tunables glibc.malloc.hugetlb=1") == 1
  assert out.count("Exit codes") == 1
  # Something else calling main() (a notebook kernel, say) is never replaced.
  out = _run(cli_run.format(name="ipykernel_launcher.py"))
  assert out.count("tunables None") == 1 and "glibc.malloc.hugetlb" not in out
  assert out.count("Exit codes") == 1
