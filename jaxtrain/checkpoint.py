"""Orbax checkpoints: params, optimizer state and the data iterator, saved together.

Layout: `WORKDIR/checkpoints/<step>/{params,opt_state,meta,data}`. Params and optimizer state are
separate items so that `load_model` and `jaxtrain eval` restore params alone. Restores always
take explicit target shardings (abstract arrays carrying a `sharding`), so a checkpoint written
on one mesh loads onto any other mesh or device count (orbax#648, #683).
"""

import logging
import os

import jax
import orbax.checkpoint as ocp


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


class Checkpointer:

  def __init__(self, directory, keep=2, async_save=True, read_only=False):
    if read_only:
      logging.getLogger("absl").addFilter(_READ_ONLY_FILTER)  # once: filters are a set
    self.directory = os.path.abspath(directory)
    # Read-only: pass the values Orbax would force (and warn about) itself.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
        read_only=read_only, create=not read_only,
        **({"save_interval_steps": 0} if read_only else {}))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

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
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

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
    if data_iterator is not None and "data" in self.items(step):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return {k: restored[k] for k in items}

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
