"""The package is pure Python and leaves its process alone (DESIGN.md): one py3-none-any wheel, no
compiled sources, nothing that preloads a library or rewrites the environment."""

import pathlib
import re
import shutil
import subprocess
import sys


REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jaxtrain"


def test_the_wheel_is_pure_python(tmp_path):
  source = tmp_path / "src"  # setuptools builds in the source tree: keep the checkout clean
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
  # Built as pip builds it for users: in an isolated environment with pyproject's build backend.
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                  str(source)], check=True, timeout=600)
  (wheel,) = tmp_path.glob("*.whl")
  assert wheel.name.endswith("-py3-none-any.whl"), wheel.name


# Worker processes that the package starts itself may set their own environment.
WORKER_INITIALISERS = {"jaxtrain/data/store.py"}


def test_no_native_code_and_no_process_wide_tweaks():
  assert not [p for p in PACKAGE.rglob("*") if p.suffix in (".c", ".cc", ".cpp", ".cu", ".so")]
  offending = re.compile(r"LD_PRELOAD|ctypes|GLIBC_TUNABLES|os\.exec|os\.environ\[[^]]+\]\s*=|"
                         r"os\.environ\.(setdefault|update)|putenv")
  hits = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py")
          if str(p.relative_to(REPO)) not in WORKER_INITIALISERS
          for i, line in enumerate(p.read_text().splitlines(), 1) if offending.search(line)]
  assert not hits, hits
