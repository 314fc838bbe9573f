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


def _run(code, **extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXTRAIN_HUGEPAGES")}
  env.update(extra_env)
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, check=True).stdout


@needs_tunable
def test_reexec_starts_python_again_with_the_tunable():
  code = ("from jaxtrain import hugepages; "
          "hugepages.reexec_with_hugepages(['-c', 'import os; print(os.environ[\"GLIBC_TUNABLES\"])']); "
          "print('not restarted')")
  assert _run(code).strip() == "glibc.malloc.hugetlb=1"
  assert _run(code, JAXTRAIN_HUGEPAGES="0").strip() == "not restarted"


@needs_tunable
def test_the_command_restarts_once_and_still_runs():
  code = ("import sys; sys.argv = ['jaxtrain', '--help']; from jaxtrain import cli; "
          "sys.exit(cli.main())")
  out = _run(code)
  assert "jaxtrain train" in out and out.count("Exit codes") == 1
