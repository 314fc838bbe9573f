"""Orbax checkpoints: params, optimizer state and the data iterator, saved together.

Layout: `WORKDIR/checkpoints/<step>/{params,opt_state,meta,data}`. Params and optimizer state are
separate items so that `load_model` and `jaxtrain eval` restore params alone. Restores always
take explicit target shardings (abstract arrays carrying a `sharding`), so a checkpoint written
on one mesh loads onto any other mesh or device count (orbax#648, #683).

Validity. Orbax (0.12) writes a step into `<step>.orbax-checkpoint-tmp/` and renames it when
complete, leaving `commit_success.txt` in the step and in each item. A step directory counts as a
checkpoint only if those markers are there and its metadata files parse (`check_step`); restores
fall back to the newest older one that passes and restores (`restore_latest`), with a warning
naming every step passed over. Invalid steps are moved to `checkpoints.invalid/` so that Orbax's
retention (which deletes old steps only after a new one is finalized) never counts them as kept.
"""

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import sys
import time
import warnings

import jax
import orbax.checkpoint as ocp

from jaxtrain.errors import RunFailure, UserError

COMMIT_MARKER = "commit_success.txt"  # What Orbax leaves in a finalized step and item.
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "params/_METADATA", "opt_state/_METADATA")


def check_step(directory, step):
  """Why `directory/<step>` is not a usable checkpoint, or None when its markers and metadata
  are in order (array data is checked by restoring it)."""
  path = os.path.join(directory, str(step))
  if not os.path.isfile(os.path.join(path, COMMIT_MARKER)):
    return f"no {COMMIT_MARKER} (the save did not finish)"
  items = [n for n in os.listdir(path) if not n.startswith((".", "_")) and
           os.path.isdir(os.path.join(path, n))]
  for name in ("params", "meta"):
    if name not in items:
      return f"item {name}/ is missing"
  for name in items:
    if not os.path.isfile(os.path.join(path, name, COMMIT_MARKER)):
      return f"item {name}/ has no {COMMIT_MARKER}"
  for rel in _JSON_FILES:
    file = os.path.join(path, rel)
    if rel.startswith("opt_state/") and "opt_state" not in items:
      continue
    try:
      with open(file) as f:
        value = json.load(f)
    except FileNotFoundError:
      return f"{rel} is missing"
    except (OSError, ValueError) as e:
      return f"{rel} is garbled ({type(e).__name__})"
    if rel == "meta/metadata" and (not isinstance(value, dict) or value.get("step") != step):
      return f"{rel} does not name step {step}"
  return None


def newest_step(directory):
  """The newest step of `directory` that passes `check_step`, or None."""
  if not os.path.isdir(directory):
    return None
  for step in sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True):
    if check_step(directory, step) is None:
      return step
  return None


def newest_config(directory):
  """(step, the config dict saved with it) of the newest step that passes `check_step`, or
  (None, None): no such step, or it was not written by training (a workdir converted from HF
  holds step 0 without a config). Plain file reads: no Orbax, nothing compiled."""
  step = newest_step(directory)
  if step is None:
    return None, None
  with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
    config = json.load(f).get("config")
  return (step, config) if isinstance(config, dict) else (None, None)


def check_writable(workdir):
  """Create `workdir` and `workdir/checkpoints` and write a probe file in each, or raise a
  one-line UserError naming the directory (before anything is compiled)."""
  for path in (workdir, os.path.join(workdir, "checkpoints")):
    # Host and pid: processes on other nodes of a shared workdir can have the same pid.
    probe = os.path.join(path, f".write-test-{socket.gethostname()}-{os.getpid()}")
    try:
      os.makedirs(path, exist_ok=True)
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise UserError(f"workdir {workdir}: cannot write in {path} ({e.strerror or e}); choose "
                      "another --workdir or fix its permissions") from None


def warn_stderr(message):
  """The default for `warn=`: one line on stderr, never a Python warning with its source line."""
  print(f"warning: {message}", file=sys.stderr, flush=True)


def one_line(e):
  """An exception's root cause on one line. Orbax wraps a failed read (which names the array and
  file: 'OUT_OF_RANGE: Error reading "blocks.mlp.w_up/0.0.0" ...') in an exception that prints
  the whole TensorStore spec instead."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}"


class _FailedReadEchoes(logging.Filter):
  """Silences the echoes of a failed restore, which Orbax (0.12) prints after our warning.

  When one array of a step fails to read, Orbax closes its event loop with the step's other
  reads still pending. Later, at moments nobody controls, TensorStore's callbacks find the loop
  closed ("RuntimeError: Event loop is closed", from a C++ thread), the abandoned tasks and
  futures log "... exception was never retrieved" (asyncio's logger), and the suspended reads
  raise again when freed ("Exception ignored in: <coroutine object
  _read_array_index_and_device_put>", or "RuntimeWarning: coroutine ... was never awaited"):
  up to hundreds of traceback lines, each with the whole TensorStore spec, after the one line
  that said which step failed and why (`restore_latest`).

  `around(restore)` installs an unraisable-exception hook (chained to the one it replaces) and a
  filter on asyncio's logger that drop exactly those; if the restore succeeds and none failed
  before in this process, both are removed again. After a failure it also ignores the warning
  for never-awaited coroutines (in this process, from then on).
  """

  def __init__(self):
    super().__init__()
    self.previous_hook = None
    self.failed = False  # a restore failed in this process: its echoes may come at any time

  @contextlib.contextmanager
  def around(self):
    if sys.unraisablehook != self.unraisable:
      self.previous_hook, sys.unraisablehook = sys.unraisablehook, self.unraisable
    logging.getLogger("asyncio").addFilter(self)  # once: filters are a set
    try:
      yield
    except BaseException:
      # The suspended reads that are never resumed warn when freed (to the front of the
      # filters each time: code that reset them meanwhile gets it back).
      warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                              category=RuntimeWarning)
      self.failed = True
      raise
    finally:
      if not self.failed:
        logging.getLogger("asyncio").removeFilter(self)
        if sys.unraisablehook == self.unraisable:
          sys.unraisablehook = self.previous_hook

  def unraisable(self, unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    orbax_read = code is not None and "orbax" in code.co_filename.replace(os.sep, "/").split("/")
    closed_loop = (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                   and str(unraisable.exc_value) == "Event loop is closed")
    if not (orbax_read or closed_loop):
      self.previous_hook(unraisable)

  def filter(self, record):
    message = record.getMessage()
    return not (message.startswith(("Task exception was never retrieved",
                                    "Future exception was never retrieved"))
                and ("orbax" in message or "tensorstore" in message))


_FAILED_READ_ECHOES = _FailedReadEchoes()


class _ReadOnlyNotices(logging.Filter):
  """Drops Orbax's notices that a read-only CheckpointManager is read-only (absl warnings:
  "Given directory is read only=...", "... is read only, save/delete will be skipped"), which
  every `jaxtrain eval`, `load_model` and `generate` printed; other records pass."""

  def filter(self, record):
    return not (record.name == "absl" and "read only" in str(record.msg)
                and record.pathname.replace(os.sep, "/").endswith(
                    "orbax/checkpoint/checkpoint_manager.py"))


_READ_ONLY_FILTER = _ReadOnlyNotices()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs that carry the target sharding Orbax restores onto."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class CheckpointError(UserError):
  """No checkpoint of a non-empty directory can be restored (one line, exit code 2)."""


class Checkpointer:

  def __init__(self, directory, keep=2, async_save=True, read_only=False):
    if read_only:
      logging.getLogger("absl").addFilter(_READ_ONLY_FILTER)  # once: filters are a set
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self._writing = None  # The step of the save in flight (async writes fail later, in wait()).
    self._failure = None
    # Read-only: pass the values Orbax would force (and warn about) itself.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
        read_only=read_only, create=not read_only,
        # A save killed half-way leaves `<step>.orbax-checkpoint-tmp`; remove it on start.
        cleanup_tmp_directories=not read_only,
        **({"save_interval_steps": 0} if read_only else {}))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def valid_steps(self, warn=warn_stderr):
    """Steps that pass `check_step`, newest first; `warn` names each one that does not."""
    good = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      reason = check_step(self.directory, step)
      if reason is None:
        good.append(step)
      elif warn is not None:
        warn(f"checkpoint step {step} in {self.directory} is invalid: {reason}; skipped")
    return good

  def latest_valid_step(self, warn=warn_stderr):
    steps = self.valid_steps(warn)
    return steps[0] if steps else None

  def restore_latest(self, abstract_params, abstract_opt_state=None, data_iterator=None,
                     warn=warn_stderr):
    """(step, restored items) from the newest checkpoint that passes `check_step` and restores,
    or (None, None) when the directory holds none. Every invalid step is named in a warning and
    moved to `checkpoints.invalid/` (process 0), so that training never resumes from it, never
    saves over it and retention never counts it as a kept checkpoint. If steps exist but none
    restores (e.g. the config changed shapes), that is an error, never a fresh start."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    bad = {}
    for step in steps:
      reason = check_step(self.directory, step)
      if reason is None:
        try:
          restored = self.restore(step, abstract_params, abstract_opt_state, data_iterator)
        except Exception as e:  # pylint: disable=broad-except
          reason = f"restore failed ({one_line(e)})"
        else:
          self._set_aside(bad, warn)
          return step, restored
      bad[step] = reason
      warn(f"checkpoint step {step} in {self.directory} is invalid: {reason}; "
           "trying an older one")
    if bad:
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores (steps {sorted(bad)}; newest: "
          f"{bad[max(bad)]}); move the directory away to start afresh")
    return None, None

  def _set_aside(self, bad, warn):
    if not bad or self.read_only:
      return
    if jax.process_index() == 0:
      aside = self.directory + ".invalid"
      os.makedirs(aside, exist_ok=True)
      for step in bad:
        target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(os.path.join(self.directory, str(step)), target)
        warn(f"moved invalid checkpoint step {step} to {target}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("jaxtrain_checkpoint_set_aside")
    self.manager.reload()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, params, opt_state, meta, data_iterator=None):
    """Asynchronous: returns once arrays are copied off the device, so the state may be donated
    to the next step right away. `wait()` blocks until files are on disk."""
    import grain  # pylint: disable=import-outside-toplevel
    items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
    if opt_state is not None:  # None: a params-only checkpoint (an imported or exported model).
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.wait()  # A failure of the previous (async) save is raised here, naming its step.
    self._writing = step
    with self._write_errors():
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _write_errors(self):
    """Turn a failed write (disk full, file too large, permissions: Orbax raises OSError or
    tensorstore's ValueError) into one RunFailure naming the step and the intact previous one."""
    import contextlib  # pylint: disable=import-outside-toplevel

    @contextlib.contextmanager
    def guard():
      if self._failure is not None:
        raise self._failure
      try:
        yield
      except Exception as e:  # pylint: disable=broad-except
        step = self._writing
        previous = [s for s in self.valid_steps(warn=None) if s != step]
        kept = (f"the previous checkpoint (step {previous[0]}) is intact" if previous else
                "no earlier checkpoint exists")
        self._failure = RunFailure(
            f"checkpoint step {step} could not be written to {self.directory} ({one_line(e)}); "
            f"{kept}; free space (or fix permissions) and re-run the same command to resume")
        raise self._failure from e
    return guard()

  def items(self, step):
    """Names of the items saved at `step` (params-only checkpoints have no opt_state)."""
    path = os.path.join(self.directory, str(step))
    return sorted(n for n in os.listdir(path) if not n.startswith((".", "_")))

  def restore(self, step, abstract_params, abstract_opt_state=None, data_iterator=None):
    """Restore onto the shardings the abstract trees carry; returns a dict of the items asked."""
    import grain  # pylint: disable=import-outside-toplevel
    items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
    if abstract_opt_state is not None and "opt_state" in self.items(step):
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    data_state = None
    if data_iterator is not None and "data" in self.items(step):
      data_dir = os.path.join(self.directory, str(step), "data")
      own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
      if os.path.exists(own):
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:  # Written by another process count: the state is global (the same in every file).
        with open(sorted(glob.glob(os.path.join(data_dir, "process_0-of-*.json")))[0]) as f:
          data_state = json.load(f)
    with _FAILED_READ_ECHOES.around():
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    out = {k: restored[k] for k in items}
    if data_state is not None:
      data_iterator.set_state(data_state)
      out["data"] = data_iterator
    return out

  def restore_params(self, step, abstract_params):
    """The params of `step` (one the caller named), or a one-line UserError with the cause."""
    try:
      return self.restore(step, abstract_params)["params"]
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"{self.directory} step {step} could not be restored ({one_line(e)})"
                      ) from None

  def wait(self):
    with self._write_errors():
      self.manager.wait_until_finished()
    self._writing = None

  def close(self):
    """Wait for the save in flight and close; after a failed write, close without raising again
    (the failure was raised already)."""
    failed = self._failure is not None
    try:
      self.wait()
    except RunFailure:
      if failed:
        return
      raise
    self.manager.close()
