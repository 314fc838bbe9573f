"""The `jaxtrain` command as a user runs it: the quickstart path, exit codes, info, eval,
compare, convert."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from jaxtrain import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, env_extra=None, timeout=600):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "jaxtrain.cli", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """`jaxtrain train` on the default config, shortened: the README's first command's path."""
  root = tmp_path_factory.mktemp("cli")
  workdir = str(root / "run")
  args = ["train", "--config=configs/default.py", f"--workdir={workdir}",
          "--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_every=2",
          "--config.train.eval_batches=1", "--config.train.batch_size=4",
          "--config.data.max_docs=60", f"--config.data.data_dir={root / 'data'}",
          "--config.model.vocab_size=512", "--config.model.n_layers=2",
          "--config.model.d_model=64", "--config.model.d_ff=128",
          "--config.checkpoint.every=2", "--config.train.progress_bar=false",
          "--config.optimizer.warmup_steps=1"]
  result = run_cli(args)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, args, result


def test_train_command_writes_the_documented_workdir(quick_run):
  workdir, _, result = quick_run
  assert "done:" in result.stdout
  names = set(os.listdir(workdir))
  assert {"config.json", "metrics.jsonl", "run.json", "loss.png", "checkpoints",
          "tokenizer"} <= names
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if "split" not in r] == [2, 4]
  assert [r["step"] for r in records if r.get("split") == "validation"] == [2, 4]


def test_rerunning_the_same_command_resumes_and_does_not_retrain(quick_run):
  workdir, args, _ = quick_run
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  result = run_cli(args)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resumed from" in result.stdout
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def test_eval_of_several_steps_writes_eval_json_without_orbax_warnings(quick_run, capsys,
                                                                        caplog):
  workdir, _, _ = quick_run
  with caplog.at_level("WARNING"):
    assert cli.main(["eval", f"--workdir={workdir}", "--steps=all", "--batches=1"]) == 0
  assert not [r for r in caplog.records if "read only" in r.getMessage()
              or "read_only" in r.getMessage()]
  capsys.readouterr()
  with open(os.path.join(workdir, "eval.json")) as f:
    results = json.load(f)["results"]
  assert [r["step"] for r in results] == [2, 4]
  assert {"loss", "perplexity", "bits_per_byte", "tokens", "train_tokens", "split"} <= set(results[0])
  assert results[1]["train_tokens"] == 2 * results[0]["train_tokens"]
  assert cli.main(["eval", workdir, "--steps=2,99"]) == 2
  assert "no step 99" in capsys.readouterr().err


def test_eval_and_load_model_read_the_run(quick_run, capsys):
  workdir, _, _ = quick_run
  assert cli.main(["eval", f"--workdir={workdir}", "--batches=1"]) == 0
  out = capsys.readouterr().out
  assert "bits_per_byte=" in out and "perplexity=" in out
  import jax.numpy as jnp
  import jaxtrain
  model, tokenizer = jaxtrain.load_model(workdir)
  ids = tokenizer.encode("def f(x):\n    return x\n")
  logits = model(jnp.asarray([ids]))
  assert logits.shape == (1, len(ids), 512) and logits.dtype == jnp.float32


def _fake_run(directory, lines):
  directory.mkdir()
  (directory / "run.json").write_text(json.dumps(
      {"device_kind": "cpu", "num_devices": 1, "peak_tflops_per_device": 0.1,
       "flops_per_token": 1e6, "tokens_per_step": 100}))
  (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  return str(directory)


def test_compare_takes_a_resumed_steps_last_line_the_overall_eval_and_shows_divergence(tmp_path):
  from jaxtrain import compare as compare_lib  # pylint: disable=import-outside-toplevel
  train = lambda step, loss: {"step": step, "loss": loss, "tokens_per_sec": 10.0, "mfu": 0.1}
  resumed = _fake_run(tmp_path / "resumed", [
      train(1, 5.0), train(2, 4.0), train(3, 3.5), train(2, 4.1), train(3, 3.4), train(4, 3.0),
      {"step": 4, "split": "validation", "eval_loss": 3.2},
      {"step": 4, "split": "validation", "source": "b", "eval_loss": 9.9}])
  r = compare_lib.summarize(resumed)
  assert [step for step, _ in r["curve_tokens"]] == [100, 200, 300, 400]
  assert r["curve_tokens"][1][1] == 4.1 and r["final_eval_loss"] == 3.2
  diverged = compare_lib.summarize(_fake_run(tmp_path / "diverged", [
      train(1, 5.0), train(2, None), {"step": 2, "split": "validation", "eval_loss": None}]))
  assert diverged["steps"] == 2 and math.isnan(diverged["final_loss"])
  assert "| nan |" in compare_lib.table([diverged])


def test_compare_prints_a_table_and_a_plot(quick_run, tmp_path, capsys):
  workdir, _, _ = quick_run
  out_png = str(tmp_path / "cmp.png")
  assert cli.main(["compare", workdir, workdir, f"--out={out_png}"]) == 0
  text = capsys.readouterr().out
  assert "MFU / first" in text and "| 1.00 |" in text
  assert os.path.getsize(out_png) > 1000


@pytest.mark.parametrize("args, culprit", [
    (["train", "--config.model.n_heads=3"], "model.n_heads"),
    (["train", "--config.train.stepz=3"], "train.stepz"),
    (["train", "--config.optimizer.lr=-1"], "optimizer.lr"),
    (["train", "--config=configs/nope.py"], "configs/nope.py"),
    (["train", "--config.data.source=/no/such/dir/*.txt", "--config.train.steps=1"], "/no/such"),
    (["info", "--config=configs/llama.py:2b"], "2b"),
    (["eval", "--workdir=/no/such/run"], "/no/such/run"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, culprit, capsys, tmp_path):
  code = cli.main(args + ([f"--workdir={tmp_path}/w"] if args[0] == "train" else []))
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert culprit in err and len(err.splitlines()) == 1, err


def test_info_for_1_4b_is_instant_and_counts_1_4b_parameters():
  start = time.time()
  result = run_cli(["info", "--config=configs/llama.py:1.4b", "--routing"])
  elapsed = time.time() - start
  assert result.returncode == 0, result.stderr[-2000:]
  assert "1,402,046,464" in result.stdout
  assert "blocks/attn/wq" in result.stdout
  print(f"jaxtrain info 1.4b: {elapsed:.1f}s")


def test_info_of_a_per_device_batch_preset_counts_flops_per_device(capsys):
  assert cli.main(["info", "--config=configs/llama.py:1.4b,h100"]) == 0
  out = capsys.readouterr().out
  assert "per device (16,384 tokens: train.batch_size_per_device=8)" in out, out


def test_sigterm_saves_a_checkpoint_and_logs_the_last_step_before_exiting(quick_run, tmp_path):
  _, args, _ = quick_run
  workdir = str(tmp_path / "preempted")
  args = [a for a in args if not a.startswith(("--workdir", "--config.train.steps",
                                               "--config.train.log_every"))]
  args += [f"--workdir={workdir}", "--config.train.steps=100000", "--config.train.log_every=1",
           "--config.checkpoint.every=100000"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen([sys.executable, "-m", "jaxtrain.cli", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2:
      break
    time.sleep(0.5)
  proc.send_signal(15)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1, err[-2000:]
  assert "preempted (SIGTERM) at step" in err and "re-run the same command" in err
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert len(steps) == 1 and steps[0] >= 2
  logged = [json.loads(line)["step"] for line in open(metrics) if "split" not in line]
  assert max(logged) == steps[0]
