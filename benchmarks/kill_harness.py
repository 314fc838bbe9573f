"""kill -9 a training run at random moments and check that re-running it loses nothing.

  python -m benchmarks.kill_harness                    # 12 kill points (4 runs x 3 kills)
  python -m benchmarks.kill_harness --kills=30 --seed=1 --per-run=3

One uninterrupted `jaxtrain train` of a tiny model is the reference. Each trial runs the same
command in a fresh workdir and kills it (SIGKILL: no handler, no cleanup) `--per-run` times, each
time at a moment of one of three kinds, drawn at random:

  step        a random delay after a random number of logged steps: mid-step, mid-dispatch
  checkpoint  as soon as Orbax's `<step>.orbax-checkpoint-tmp` directory appears: mid-async-write
  eval        as soon as the train line of an evaluation step is logged: during evaluation

then re-runs the command until it finishes. A trial passes when every step's loss and every
evaluation's loss equal the reference's (bitwise: JSON floats written by repr) and the final
parameters are bitwise equal. Checkpoints are kept with checkpoint.keep=1, so a kill during a
write also checks that retention never deleted the last complete checkpoint first. "Work lost"
per kill is the number of steps done before the kill that the re-run had to redo.

Prints a markdown table (one row per kill) and a summary line; exit code 0 when all trials pass.
Runs on CPU (one device, like a user's `jaxtrain train`); about 15 s per process start here.
"""

import argparse
import datetime
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("step", "checkpoint", "eval")
STEPS, EVERY, EVAL_EVERY = 12, 3, 4


def make_corpus(root):
  """Sixty small text documents (the same ones every time)."""
  rng = random.Random(0)
  words = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "x"]
  os.makedirs(root, exist_ok=True)
  for i in range(60):
    text = " ".join(rng.choice(words) for _ in range(rng.randint(40, 120)))
    with open(os.path.join(root, f"doc{i:03d}.txt"), "w") as f:
      f.write(text + "\n")
  return root


def train_args(workdir, corpus_dir, data_dir):
  return ["train", f"--workdir={workdir}", f"--config.data.source={corpus_dir}/*.txt",
          f"--config.data.data_dir={data_dir}", "--config.data.seq_len=16",
          "--config.data.prepare_workers=1",
          "--config.model.vocab_size=320", "--config.model.d_model=32", "--config.model.n_layers=2",
          "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.d_ff=64",
          "--config.model.max_seq_len=32", "--config.model.attention=xla",
          f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
          "--config.train.log_every=1", f"--config.train.eval_every={EVAL_EVERY}",
          "--config.train.eval_batches=2", "--config.train.progress_bar=false",
          "--config.optimizer.lr=0.01", "--config.optimizer.warmup_steps=2",
          f"--config.checkpoint.every={EVERY}", "--config.checkpoint.keep=1",
          "--config.checkpoint.async_save=true"]


def _env(cache_dir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One device, as a user has.
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  # Every process compiles the same step: JAX's persistent cache lets the re-runs load it (the
  # same executable, so the numbers cannot change) instead of compiling it again.
  env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _start(args, log):
  workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
  cache_dir = os.path.join(os.path.dirname(workdir), "jax_cache")
  return subprocess.Popen([sys.executable, "-m", "jaxtrain.cli", *args], cwd=REPO,
                          env=_env(cache_dir), stdout=log, stderr=subprocess.STDOUT)


def records(workdir):
  """(train records by step, eval records by step): the last line written for each step wins,
  as a resumed run rewrites the lines of the steps it redoes."""
  train, evals = {}, {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except ValueError:  # A line cut by the kill.
          continue
        if r.get("split") == "validation" and "source" not in r:
          evals[r["step"]] = r
        elif "split" not in r:
          train[r["step"]] = r
  return train, evals


def _tmp_checkpoint(workdir):
  return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))


def run_to_completion(args, log, timeout=900):
  proc = _start(args, log)
  code = proc.wait(timeout=timeout)
  if code != 0:
    raise RuntimeError(f"jaxtrain train exited with {code}; see {log.name}")


def kill_once(args, workdir, phase, rng, log, timeout=600):
  """Start the run, kill -9 it at a moment of kind `phase`; returns what happened."""
  done_before = max(records(workdir)[0], default=0)
  metrics = os.path.join(workdir, "metrics.jsonl")
  size_before = os.path.getsize(metrics) if os.path.exists(metrics) else 0
  proc = _start(args, log)
  deadline = time.time() + timeout
  target = rng.randint(done_before + 1, STEPS - 1) if done_before + 1 < STEPS else STEPS
  delay = rng.uniform(0.0, 0.3)
  hit = False
  while time.time() < deadline and proc.poll() is None:
    train, evals = records(workdir)
    if phase == "step" and max(train, default=0) >= target:
      time.sleep(delay)
      hit = True
    elif (phase == "checkpoint" and _tmp_checkpoint(workdir) and os.path.exists(metrics)
          and os.path.getsize(metrics) > size_before):  # (past start-up, which removes old ones)
      hit = True
    elif phase == "eval" and any(s % EVAL_EVERY == 0 and s > done_before and s not in evals
                                 for s in train):
      hit = True
    if hit:
      break
    time.sleep(0.002)
  in_tmp = bool(_tmp_checkpoint(workdir))
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = True
  else:
    killed = False  # The run ended before the moment came (counted, not a failure).
  train, evals = records(workdir)
  last = max(train, default=0)
  return {"phase": phase, "killed": killed, "hit": hit, "last_logged_step": last,
          "checkpoint_write_in_flight": in_tmp,
          "eval_in_flight": phase == "eval" and any(s % EVAL_EVERY == 0 and s not in evals
                                                    for s in train if s > done_before)}


def _latest_checkpoint(workdir):
  steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()] \
      if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
  return max(steps, default=0)


def final_params(workdir):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jaxtrain  # pylint: disable=import-outside-toplevel
  model, _ = jaxtrain.load_model(workdir)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def compare(reference, workdir):
  """A list of differences from the reference run (empty: identical)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  problems = []
  ref_train, ref_eval = records(reference)
  train, evals = records(workdir)
  if sorted(train) != list(range(1, STEPS + 1)):
    problems.append(f"logged steps {sorted(train)}")
  for step, r in ref_train.items():
    if step in train and train[step]["loss"] != r["loss"]:
      problems.append(f"step {step} loss {train[step]['loss']!r} != {r['loss']!r}")
  for step, r in ref_eval.items():
    if step not in evals or evals[step]["eval_loss"] != r["eval_loss"]:
      problems.append(f"eval at step {step} differs or is missing")
  a, b = final_params(reference), final_params(workdir)
  if len(a) != len(b) or any(not np.array_equal(x, y) for x, y in zip(a, b)):
    problems.append("final parameters differ")
  return problems


def run(kills=12, per_run=3, seed=0, root=None, phases=None, out=print):
  """Run the harness; returns a summary dict (also printed as a table)."""
  rng = random.Random(seed)
  root = root or tempfile.mkdtemp(prefix="kill_harness_")
  corpus = make_corpus(os.path.join(root, "corpus"))
  data_dir = os.path.join(root, "data")
  reference = os.path.join(root, "reference")
  with open(os.path.join(root, "reference.log"), "w") as log:
    run_to_completion(train_args(reference, corpus, data_dir), log)
  rows, failures, trials, runs = [], [], 0, 0
  planned = list(phases) if phases else [rng.choice(PHASES) for _ in range(kills)]
  while planned:
    trial, chunk, planned = trials, planned[:per_run], planned[per_run:]
    trials += 1
    workdir = os.path.join(root, f"trial{trial}")
    args = train_args(workdir, corpus, data_dir)
    with open(os.path.join(root, f"trial{trial}.log"), "w") as log:
      for phase in chunk:
        result = kill_once(args, workdir, phase, rng, log)
        runs += 1
        result["resumes_from"] = _latest_checkpoint(workdir)
        result["work_lost"] = max(0, result["last_logged_step"] - result["resumes_from"])
        rows.append({"trial": trial, **result})
      run_to_completion(args, log)
      runs += 1
    problems = compare(reference, workdir)
    for row in rows:
      if row["trial"] == trial:
        row["ok"] = not problems
    if problems:
      failures.append({"trial": trial, "problems": problems})
  killed = [r for r in rows if r["killed"]]
  summary = {
      "date": datetime.date.today().isoformat(), "kill_points": len(rows),
      "killed": len(killed), "trials": trials, "process_runs": runs + 1,
      "survived": sum(r["ok"] for r in killed),
      "during_checkpoint_write": sum(r["checkpoint_write_in_flight"] for r in killed),
      "during_eval": sum(r["eval_in_flight"] for r in killed),
      "max_work_lost_steps": max((r["work_lost"] for r in killed), default=0),
      "checkpoint_every": EVERY, "failures": failures, "root": root}
  out("| trial | kill at | killed | last logged step | ckpt write in flight | resumed from | "
      "steps redone | identical |")
  out("|---|---|---|---|---|---|---|---|")
  for r in rows:
    out(f"| {r['trial']} | {r['phase']} | {'yes' if r['killed'] else 'ended first'} | "
        f"{r['last_logged_step']} | {'yes' if r['checkpoint_write_in_flight'] else 'no'} | "
        f"{r['resumes_from']} | {r['work_lost']} | {'yes' if r['ok'] else 'NO'} |")
  out(f"\n{summary['killed']} kills in {trials} runs ({summary['during_checkpoint_write']} during "
      f"an async checkpoint write, {summary['during_eval']} during evaluation): "
      f"{summary['survived']} resumed bitwise identical; at most {summary['max_work_lost_steps']} "
      f"steps redone (checkpoint.every={EVERY}); {summary['date']}")
  for f in failures:
    out(f"FAILED trial {f['trial']}: {'; '.join(f['problems'])}")
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=12, help="kill points in all (>= 10 by hand)")
  parser.add_argument("--per-run", type=int, default=3, help="kills per trial before it finishes")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default=None, help="where the workdirs go (default: a temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the workdirs afterwards")
  args = parser.parse_args(argv)
  summary = run(args.kills, args.per_run, args.seed, args.root)
  print(json.dumps({k: v for k, v in summary.items() if k != "failures"}))
  if not args.keep:
    shutil.rmtree(summary["root"], ignore_errors=True)
  return 0 if not summary["failures"] and summary["survived"] == summary["killed"] else 1


if __name__ == "__main__":
  sys.exit(main())
