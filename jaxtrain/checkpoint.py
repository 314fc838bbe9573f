"""Orbax checkpoints: params, optimizer state and the data iterator, saved together.

Layout: `WORKDIR/checkpoints/<step>/{params,opt_state,meta,data}`. Params and optimizer state are
separate items so that `load_model` and `jaxtrain eval` restore params alone. Restores always
take explicit target shardings (abstract arrays carrying a `sharding`), so a checkpoint written
on one mesh loads onto any other mesh or device count (orbax#648, #683).
"""

import glob
import json
import os

import jax
import orbax.checkpoint as ocp


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs that carry the target sharding Orbax restores onto."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:

  def __init__(self, directory, keep=2, async_save=True, read_only=False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only)
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
    data_state = None
    if data_iterator is not None and "data" in self.items(step):
      data_dir = os.path.join(self.directory, str(step), "data")
      own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
      if os.path.exists(own):
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:  # Written by another process count: the state is global (the same in every file).
        with open(sorted(glob.glob(os.path.join(data_dir, "process_0-of-*.json")))[0]) as f:
          data_state = json.load(f)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    out = {k: restored[k] for k in items}
    if data_state is not None:
      data_iterator.set_state(data_state)
      out["data"] = data_iterator
    return out

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
