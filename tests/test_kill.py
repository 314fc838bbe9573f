"""kill -9 at three kinds of moments (mid-evaluation, mid-async-checkpoint-write, mid-step), one
after another in one workdir (in that order: an evaluation or a checkpoint write the earlier kills
already carried the run past cannot be hit, and the run would end first), then a re-run: every step's loss, every evaluation and the final
parameters equal an uninterrupted run's, bitwise (benchmarks/kill_harness.py; by hand it runs
N >= 10 random kill points, see docs/reliability.md)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("kill_harness", os.path.join(ROOT, "benchmarks",
                                                                            "kill_harness.py"))
kill_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_harness)


def test_kill_9_during_a_step_a_checkpoint_write_and_an_eval_loses_nothing(tmp_path):
  lines = []
  summary = kill_harness.run(phases=["eval", "checkpoint", "step"], per_run=3, seed=0,
                             root=str(tmp_path), out=lines.append)
  print("\n".join(lines))
  assert summary["failures"] == [], summary["failures"]
  assert summary["killed"] == 3 and summary["survived"] == 3, lines
  assert summary["during_checkpoint_write"] >= 1, lines
