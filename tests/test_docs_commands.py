"""The shell commands that README.md and docs/*.md mark runnable run, so the docs cannot rot.

How to mark a command: put it in a fenced block whose info string is `bash runnable`:

    ```bash runnable
    jaxtrain info --config=configs/llama.py:toy
    ```

Each line of such a block is one command (a line ending in `\\` continues on the next; `#` lines
are comments). The commands of a block run in order, in one scratch directory that holds links to
the repo's `configs/`, `tests/`, `docs/` and `notebooks/` (so relative paths work and runs never
land in the repo), with `jaxtrain` meaning this checkout, prepared data in the scratch directory
and one CPU device. Mark only commands that finish in seconds on a CPU: small configs or
overrides, no GPU, no torch, no network.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```bash runnable[ \t]*\n(.*?)^```", re.M | re.S)
LINKED = ("configs", "tests", "docs", "notebooks")


def runnable_blocks():
  """[(file relative to the repo, block number, [commands])] in document order."""
  blocks = []
  docs = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
  for path in [os.path.join(REPO, "README.md")] + docs:
    with open(path) as f:
      text = f.read()
    for n, match in enumerate(FENCE.finditer(text)):
      commands, pending = [], ""
      for line in match.group(1).splitlines():
        if line.rstrip().endswith("\\"):
          pending += line.rstrip()[:-1] + " "
          continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
          commands.append(command)
      blocks.append((os.path.relpath(path, REPO), n, commands))
  return blocks


BLOCKS = runnable_blocks()


def test_the_readme_marks_its_quick_commands_runnable():
  assert any(path == "README.md" and commands for path, _, commands in BLOCKS), (
      "README.md has no ```bash runnable block: its commands would go untested")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  root = tmp_path_factory.mktemp("docs_commands")
  for name in LINKED:
    os.symlink(os.path.join(REPO, name), root / name)
  bin_dir = root / ".bin"
  bin_dir.mkdir()
  shim = bin_dir / "jaxtrain"  # this checkout's CLI, whatever is installed on PATH
  shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m jaxtrain.cli "$@"\n')
  shim.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", JAXTRAIN_DATA_DIR=str(root / ".data"),
             PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env["PATH"]]),
             PYTHONPATH=os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(
                 os.pathsep) if p]), MPLBACKEND="Agg")
  return root, env


@pytest.mark.parametrize("path, n, commands", BLOCKS, ids=[f"{p}#{n}" for p, n, _ in BLOCKS])
def test_runnable_commands_in_the_docs_succeed(path, n, commands, scratch):
  root, env = scratch
  for command in commands:
    result = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (
        f"{path} (runnable block {n}) `{command}` exited {result.returncode}:\n"
        f"{result.stderr[-3000:]}")
