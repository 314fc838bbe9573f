"""Faults a long run meets, injected: damaged checkpoints, a disk that fills during a save, a
workdir that cannot be written, non-finite losses. Each must end in exactly one of: training
resumes and reproduces the uninterrupted run bitwise, or one line naming the culprit (exit code 1
or 2) with the last good checkpoint intact. The kill -9 harness is tests/test_kill.py."""

import errno
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings as pywarnings

import jax
import numpy as np
import pytest

from jaxtrain import checkpoint as checkpoint_lib, cli, evaluate, sharding
from jaxtrain import metrics as metrics_lib
from jaxtrain import trainer as train_lib
from jaxtrain.errors import RunFailure, UserError
from test_train import corpus, tiny_config  # noqa: F401  (corpus is a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
quiet = lambda *_: None


def _mesh():
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def _config(corpus, steps=STEPS, **train):
  cfg = tiny_config(*corpus, steps=steps, **train)
  cfg.checkpoint.update(every=2, keep=5)
  return cfg


def _train_records(workdir):
  """Step -> the last train record written for it (a resumed run rewrites the steps it redoes)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "split" not in r}


def _losses(workdir):
  records = _train_records(workdir)
  return [records[s]["loss"] for s in sorted(records)]


def _params(workdir, cfg, step=None):
  s = train_lib.make_setup(cfg, _mesh())
  return evaluate.load_params(workdir, s.abstract_state.params, step)


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """Six uninterrupted steps with checkpoints at 2, 4 and 6: what every recovery must equal."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train_lib.train(_config(corpus), workdir, mesh=_mesh(), log=quiet)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  return workdir


def _largest_file(directory):
  files = [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names]
  return max(files, key=os.path.getsize)


# ---------------------------------------------------------------------------------------------
# Corrupt and partial checkpoints.

DAMAGE = [
    ("no commit marker", lambda p: os.remove(os.path.join(p, "commit_success.txt")),
     "no commit_success.txt"),
    ("item without commit marker", lambda p: os.remove(os.path.join(p, "params",
                                                                     "commit_success.txt")),
     "item params/ has no commit_success.txt"),
    ("garbled checkpoint metadata", lambda p: open(os.path.join(p, "_CHECKPOINT_METADATA"),
                                                   "w").write("{\x00garbage"),
     "_CHECKPOINT_METADATA is garbled"),
    ("truncated meta", lambda p: open(os.path.join(p, "meta", "metadata"), "r+").truncate(7),
     "meta/metadata is garbled"),
    ("deleted params metadata", lambda p: os.remove(os.path.join(p, "params", "_METADATA")),
     "params/_METADATA is missing"),
    ("deleted item", lambda p: shutil.rmtree(os.path.join(p, "params")),
     "item params/ is missing"),
    ("meta of another step", lambda p: open(os.path.join(p, "meta", "metadata"), "w").write(
        json.dumps({"step": 99})), "does not name step 6"),
]


@pytest.mark.parametrize("name, damage, reason", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_check_step_names_each_kind_of_damage(reference, tmp_path, name, damage, reason):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(reference, "checkpoints", "6"), os.path.join(directory, "6"))
  assert checkpoint_lib.check_step(directory, 6) is None
  damage(os.path.join(directory, "6"))
  assert reason in checkpoint_lib.check_step(directory, 6), name


def test_resume_passes_over_damaged_checkpoints_and_reproduces_the_run_bitwise(
    corpus, reference, tmp_path, capsys):
  """Step 6 has a truncated array file (found by restoring it), step 4 no commit marker (found
  by its check): training resumes from step 2, names both, sets them aside, redoes 3..6 exactly."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  data_file = _largest_file(os.path.join(ckpts, "6", "params"))
  with open(data_file, "r+b") as f:
    f.truncate(os.path.getsize(data_file) // 2)
  os.remove(os.path.join(ckpts, "4", "commit_success.txt"))
  capsys.readouterr()
  # eval and export pass over the invalid newest step too (named on stderr).
  assert evaluate.load_params(workdir, train_lib.make_setup(_config(corpus), _mesh())
                              .abstract_state.params)[0] == 2
  train_lib.train(_config(corpus), workdir, mesh=_mesh(), log=print)
  out = capsys.readouterr()
  assert "checkpoint step 6" in out.err and "restore failed" in out.err
  assert "checkpoint step 4" in out.err and "no commit_success.txt" in out.err
  assert f"resumed from {ckpts}/2" in out.out
  assert sorted(os.listdir(ckpts)) == ["2", "4", "6"]
  assert sorted(n.split("-")[0] for n in os.listdir(ckpts + ".invalid")) == ["4", "6"]
  assert _losses(workdir) == _losses(reference)
  _assert_same_params(_params(workdir, _config(corpus))[1], _params(reference, _config(corpus))[1])


def test_a_failed_restore_is_one_line_without_orbax_echoes(corpus, reference, tmp_path,
                                                           monkeypatch, caplog):
  """Every array file of step 6 truncated: the warning names an array and file (the root
  cause, not Orbax's TensorStore spec), and the echoes of the reads Orbax abandons (coroutines
  raising when freed, callbacks on a closed event loop, tasks whose exception nobody read)
  never reach the user. They come at random moments, so the restore is tried five times and
  garbage is collected before the check (without the filter, most runs catch some)."""
  directory = str(tmp_path / "checkpoints")
  for step in ("4", "6"):
    shutil.copytree(os.path.join(reference, "checkpoints", step), os.path.join(directory, step))
  _damage_arrays(os.path.join(directory, "6"))
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  abstract = train_lib.make_setup(_config(corpus), _mesh()).abstract_state.params
  warnings = []
  with pywarnings.catch_warnings(record=True) as caught:
    pywarnings.simplefilter("always")
    for _ in range(5):
      ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
      assert ckpt.restore_latest(abstract, warn=warnings.append)[0] == 4
      ckpt.close()
    time.sleep(0.5)
    gc.collect()
  assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
  assert [u.object for u in unraisable] == []
  assert [r.getMessage()[:80] for r in caplog.records if r.name == "asyncio"] == []
  assert len(warnings) == 5
  for w in warnings:
    assert "checkpoint step 6" in w and "Error reading" in w and "TensorStore" not in w, w


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(corpus, reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  for step in (2, 4, 6):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA"))
  with pytest.raises(UserError) as e:
    train_lib.train(_config(corpus), workdir, mesh=_mesh(), log=quiet)
  assert "no checkpoint in" in str(e.value) and "\n" not in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]


def _damage_arrays(step_dir):
  """Truncate every array data file of a step's params to half its size."""
  data = [os.path.join(r, n) for r, _, names in os.walk(os.path.join(step_dir, "params"))
          for n in names if os.sep + "d" + os.sep in os.path.join(r, n)]
  assert data
  for path in data:
    os.truncate(path, os.path.getsize(path) // 2)


def test_eval_of_a_damaged_step_is_one_line_and_a_list_evaluates_the_others(
    reference, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  _damage_arrays(os.path.join(workdir, "checkpoints", "4"))
  capsys.readouterr()
  assert cli.main(["eval", workdir, "--step=4", "--batches=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "step 4 could not be restored" in err, err
  assert "Error reading" in err and "TensorStore" not in err
  assert cli.main(["eval", workdir, "--steps=2,4,6", "--batches=1"]) == 2
  captured = capsys.readouterr()
  assert "step 4 could not be restored" in captured.err
  assert "1 of 3 checkpoints could not be evaluated" in captured.err.splitlines()[-1]
  with open(os.path.join(workdir, "eval.json")) as f:
    assert [r["step"] for r in json.load(f)["results"]] == [2, 6]
  assert cli.main(["eval", workdir, "--batches=0"]) == 2
  assert "--batches=0 must be at least 1" in capsys.readouterr().err


def test_eval_reads_the_checkpoint_config_when_config_json_is_damaged(reference, tmp_path,
                                                                      capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  open(os.path.join(workdir, "config.json"), "w").close()  # Emptied, as by a full disk.
  capsys.readouterr()
  assert cli.main(["eval", workdir, "--batches=1"]) == 0
  captured = capsys.readouterr()
  assert "config.json is unreadable" in captured.err and "checkpoint 6" in captured.err
  assert "step=6" in captured.out


@pytest.mark.parametrize("key, value", [
    ("model.d_model", 64), ("model.rope_theta", 500000.0), ("data.max_docs", 50),
    ("data.seq_len", 8), ("data.worker_count", 1), ("train.seed", 7),
    ("optimizer.name", "muon")])
def test_resume_refuses_a_changed_model_data_seed_or_optimizer(corpus, reference, key, value):
  saved = json.loads(open(os.path.join(reference, "checkpoints", "6", "meta", "metadata")).read())
  cfg = _config(corpus)
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(UserError) as e:
    train_lib.check_resume_config(saved["config"], cfg, "run")
  assert f"{key}=" in str(e.value) and "\n" not in str(e.value)


def test_resume_with_other_settings_warns_and_a_refusal_touches_nothing(corpus, reference,
                                                                         tmp_path, capsys):
  """lr and steps may change (named in a warning). A changed seed is refused before anything in
  the workdir is written: config.json and the tokenizer stay the run's."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  before = {name: open(os.path.join(workdir, name), "rb").read()
            for name in ("config.json", "metrics.jsonl")}
  tokenizer = sorted(os.listdir(os.path.join(workdir, "tokenizer")))
  with pytest.raises(UserError) as e:
    train_lib.train(_config(corpus, **{"seed": 3}), workdir, mesh=_mesh(), log=print)
  assert "train.seed=0 (now 3)" in str(e.value)
  assert {n: open(os.path.join(workdir, n), "rb").read() for n in before} == before
  assert sorted(os.listdir(os.path.join(workdir, "tokenizer"))) == tokenizer
  cfg = _config(corpus, steps=4)
  cfg.optimizer.lr = 0.02
  capsys.readouterr()
  assert train_lib.train(cfg, workdir, mesh=_mesh(), log=print) == {"step": 6}
  captured = capsys.readouterr()
  assert "resuming with changed settings: optimizer.lr 0.01 -> 0.02; train.steps 6 -> 4" in (
      captured.err)
  assert "nothing to train" in captured.out


def test_resume_refuses_data_that_tokenizes_otherwise_and_eval_uses_the_run_tokenizer(
    corpus, reference, tmp_path):
  """The corpus under data.source changed (so BPE would be retrained): training must not go on
  with ids that mean other text, and evaluation tokenizes with the run's own tokenizer."""
  from jaxtrain.data import tokenizer as tokenizer_lib
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  run_tokenizer = os.path.join(workdir, "tokenizer")
  other = tokenizer_lib.train_bpe(["zebra quokka narwhal " * 40, "ocelot " * 30] * 5, 320)
  cfg = _config(corpus)
  assert evaluate._workdir_config(workdir).data.tokenizer == "bpe"
  evaluated = evaluate._workdir_config(workdir)
  evaluate._use_the_run_tokenizer(evaluated, workdir, other_data=False)
  assert evaluated.data.tokenizer == "bpe"  # the prepared data is the run's: nothing to change
  evaluate._use_the_run_tokenizer(evaluated, workdir, other_data=True)
  assert evaluated.data.tokenizer == os.path.join(run_tokenizer, "tokenizer.json")
  shutil.rmtree(run_tokenizer)
  other.save(run_tokenizer)  # as if the data's tokenizer had changed since the run started
  before = open(os.path.join(run_tokenizer, "tokenizer.json"), "rb").read()
  with pytest.raises(UserError) as e:
    train_lib.train(cfg, workdir, mesh=_mesh(), log=quiet)
  assert "differs from the tokenizer data.source gives now" in str(e.value)
  assert open(os.path.join(run_tokenizer, "tokenizer.json"), "rb").read() == before
  evaluated = evaluate._workdir_config(workdir)
  evaluate._use_the_run_tokenizer(evaluated, workdir, other_data=False)
  assert evaluated.data.tokenizer == os.path.join(run_tokenizer, "tokenizer.json")


def test_a_sigterm_during_the_last_checkpoint_write_and_a_half_metrics_line_lose_nothing(
    corpus, reference, tmp_path, monkeypatch):
  """The run's last save is waited for under the SIGTERM handler (before, a SIGTERM then
  killed the process and left `<step>.orbax-checkpoint-tmp`). A metrics line cut short by an
  earlier run is ended, skipped when read, and the loss plot is still drawn."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "grad_no')
  outside = []
  previous = signal.signal(signal.SIGTERM, lambda *_: outside.append("SIGTERM"))
  real_wait = checkpoint_lib.Checkpointer.wait
  sent = []

  def wait_with_sigterm(self):
    if self._writing == 8 and not sent:  # The wait for the run's last save (step 8).
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
    return real_wait(self)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "wait", wait_with_sigterm)
  try:
    train_lib.train(_config(corpus, steps=8), workdir, mesh=_mesh(), log=quiet)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert sent and outside == []  # The SIGTERM reached the trainer's handler, not the default.
  ckpts = os.path.join(workdir, "checkpoints")
  assert checkpoint_lib.check_step(ckpts, 8) is None
  assert [r["step"] for r in metrics_lib.read_metrics(workdir) if "loss" in r][-2:] == [7, 8]
  assert os.path.isfile(os.path.join(workdir, "loss.png"))


# ---------------------------------------------------------------------------------------------
# Disk full, workdir not writable.


def test_disk_full_during_a_save_is_one_error_and_the_previous_checkpoint_survives(
    corpus, reference, tmp_path, monkeypatch):
  """keep=1: the save of step 4 dies half-written (ENOSPC). Retention must not have deleted
  step 2, the error names both steps, and re-running completes the run bitwise."""
  import orbax.checkpoint as ocp
  workdir = str(tmp_path / "run")
  cfg = _config(corpus)
  cfg.checkpoint.keep = 1
  real_save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 4:
      partial = os.path.join(str(self.directory), "4.orbax-checkpoint-tmp", "params")
      os.makedirs(partial)
      open(os.path.join(partial, "half-written"), "wb").write(b"\0" * 100)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(RunFailure) as e:
    train_lib.train(cfg, workdir, mesh=_mesh(), log=quiet)
  message = str(e.value)
  assert "\n" not in message
  assert "checkpoint step 4 could not be written" in message and "No space left" in message
  assert "previous checkpoint (step 2) is intact" in message
  assert checkpoint_lib.check_step(os.path.join(workdir, "checkpoints"), 2) is None
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  train_lib.train(cfg, workdir, mesh=_mesh(), log=quiet)
  assert _losses(workdir) == _losses(reference)
  _assert_same_params(_params(workdir, cfg)[1], _params(reference, cfg)[1])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]


_FILE_TOO_LARGE = """
import resource, signal, sys
from jaxtrain import checkpoint, cli
real_save = checkpoint.Checkpointer.save
def save(self, step, *args, **kwargs):
  if step == 4:  # From here on no file may grow past 1 kB: a real write error, from the OS.
    self.wait()  # (step 2's async write finishes first)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  return real_save(self, step, *args, **kwargs)
checkpoint.Checkpointer.save = save
sys.exit(cli.main(sys.argv[1:]))
"""


def _cli_args(corpus, workdir, steps=STEPS):
  corpus_dir, data_dir = corpus
  return ["train", f"--workdir={workdir}", f"--config.data.source={corpus_dir}/*.txt",
          f"--config.data.data_dir={data_dir}", "--config.data.seq_len=16",
          "--config.model.vocab_size=320", "--config.model.d_model=32", "--config.model.n_layers=2",
          "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.d_ff=64",
          "--config.model.max_seq_len=32", "--config.model.attention=xla",
          f"--config.train.steps={steps}", "--config.train.batch_size=8",
          "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.eval_batches=2", "--config.train.progress_bar=false",
          "--config.optimizer.lr=0.01", "--config.optimizer.warmup_steps=2",
          "--config.checkpoint.every=2", "--config.checkpoint.keep=1"]


def test_a_real_write_error_exits_1_with_one_final_line(corpus, reference, tmp_path):
  """RLIMIT_FSIZE in a subprocess: the OS refuses the writes of step 4's checkpoint (EFBIG)."""
  workdir = str(tmp_path / "run")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", _FILE_TOO_LARGE, *_cli_args(corpus, workdir)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  # Orbax logs its threads' failures too (absl); ours is the one `error:` line.
  # Our line may start mid-line when a thread's log lands in front of it on the same line.
  errors = [line[m.start():] for line in proc.stderr.splitlines()
            for m in [re.search(r"(?<![A-Za-z_])error: ", line)] if m]
  assert len(errors) == 1, proc.stderr[-3000:]
  last = errors[0]
  assert last.startswith("error: checkpoint step 4 could not be written"), last
  # (The rest of the line can be interleaved with Orbax's threads' logging: not checked here.)
  ckpts = os.path.join(workdir, "checkpoints")
  assert "2" in os.listdir(ckpts) and checkpoint_lib.check_step(ckpts, 2) is None
  assert checkpoint_lib.Checkpointer(ckpts, read_only=True).valid_steps(warn=None) == [2]


def test_unwritable_workdir_is_one_line_and_exit_code_2(corpus, tmp_path, capsys):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  code = cli.main(_cli_args(corpus, str(blocker / "run")))
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert "cannot write in" in err and "a-file" in err
  if os.geteuid() != 0:  # root writes anywhere: permissions can only be tested as a user.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli.main(_cli_args(corpus, str(locked / "run"))) == 2


# ---------------------------------------------------------------------------------------------
# Non-finite losses.


def _poison(monkeypatch, steps):
  """Make the loss of the given (1-based) training steps NaN, inside the jitted step: each train
  batch carries a `poison` flag that the loss multiplies in."""
  calls = {"n": 0}
  real_to_global = train_lib.to_global
  real_loss = train_lib.loss_sum_and_count

  def to_global(batch, batch_sharding):
    if "mask" not in batch and "poison" not in batch:  # A training batch (eval ones have masks).
      calls["n"] += 1
      flag = np.float32(np.nan if calls["n"] in steps else 1.0)
      batch = {**batch, "poison": np.full(np.shape(batch["inputs"]), flag, np.float32)}
    return real_to_global(batch, batch_sharding)

  def loss(params, graphdef, batch, loss_chunk=0, **kwargs):
    loss_sum, count, *rest = real_loss(params, graphdef, batch, loss_chunk, **kwargs)
    return ((loss_sum * batch["poison"][0, 0] if "poison" in batch else loss_sum), count, *rest)

  monkeypatch.setattr(train_lib, "to_global", to_global)
  monkeypatch.setattr(train_lib, "loss_sum_and_count", loss)


def test_nonfinite_stop_names_the_step_and_keeps_the_last_finite_checkpoint(
    corpus, reference, tmp_path, monkeypatch):
  _poison(monkeypatch, steps={4})
  workdir = str(tmp_path / "run")
  with pytest.raises(RunFailure) as e:
    train_lib.train(_config(corpus), workdir, mesh=_mesh(), log=quiet)
  message = str(e.value)
  assert "non-finite loss or gradients at step 4" in message and "\n" not in message
  assert "last checkpoint (step 2" in message
  ckpts = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpts)) == ["2"]  # Step 4 was due for a checkpoint: never written.
  _, params = _params(workdir, _config(corpus))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  _assert_same_params(params, _params(reference, _config(corpus), step=2)[1])


def test_nonfinite_skip_drops_the_update_counts_it_and_goes_on(corpus, reference, tmp_path,
                                                                monkeypatch):
  _poison(monkeypatch, steps={3, 4})
  workdir = str(tmp_path / "run")
  train_lib.train(_config(corpus, on_nonfinite="skip"), workdir, mesh=_mesh(), log=quiet)
  records = _train_records(workdir)
  assert [records[s]["nonfinite"] for s in range(1, 7)] == [0, 0, 1, 1, 0, 0]
  assert records[6]["nonfinite_skipped"] == 2 and np.isfinite(records[6]["loss"])
  # Steps 3 and 4 changed nothing: the checkpoint of step 4 holds step 2's parameters.
  _assert_same_params(_params(workdir, _config(corpus), step=4)[1],
                      _params(reference, _config(corpus), step=2)[1])


def test_a_diverging_learning_rate_stops_the_run_in_both_modes(corpus, tmp_path):
  cfg = _config(corpus, steps=8, max_nonfinite_in_a_row=3)
  cfg.optimizer.lr = 1e8
  cfg.checkpoint.every = 1
  with pytest.raises(RunFailure, match=r"non-finite loss or gradients at step \d+") as e:
    train_lib.train(cfg, str(tmp_path / "stop"), mesh=_mesh(), log=quiet)
  bad_step = int(str(e.value).split("at step ")[1].split()[0])
  saved = checkpoint_lib.Checkpointer(str(tmp_path / "stop" / "checkpoints"), read_only=True)
  assert max(saved.all_steps()) == bad_step - 1
  cfg.train.on_nonfinite = "skip"
  with pytest.raises(RunFailure, match="3 non-finite steps in a row"):
    train_lib.train(cfg, str(tmp_path / "skip"), mesh=_mesh(), log=quiet)


def test_the_cli_turns_a_run_failure_into_exit_code_1_and_one_line(monkeypatch, capsys):
  import jaxtrain

  def fail(cfg, workdir):
    raise RunFailure("non-finite loss or gradients at step 7 (loss=nan); stopped")

  monkeypatch.setattr(jaxtrain, "train", fail)
  assert cli.main(["train", "--config.train.steps=1"]) == 1
  err = capsys.readouterr().err.strip()
  assert err == "error: non-finite loss or gradients at step 7 (loss=nan); stopped"


def test_nonfinite_config_keys_are_validated():
  from jaxtrain import config as config_lib
  cfg = config_lib.base_config()
  cfg.train.on_nonfinite = "ignore"
  with pytest.raises(UserError, match="train.on_nonfinite"):
    config_lib.validate(cfg)
  cfg.train.on_nonfinite = "skip"
  cfg.train.max_nonfinite_in_a_row = 0
  with pytest.raises(UserError, match="train.max_nonfinite_in_a_row"):
    config_lib.validate(cfg)
