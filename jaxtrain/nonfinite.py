"""What a training step with a non-finite loss, gradient or update does (`train.on_nonfinite`).

The step itself computes a `nonfinite` flag (and, under `skip`, drops its own update with a
`jnp.where`, so nothing leaves the device). The loop hands every step's flag to a `Guard`, which
fetches it one step late (the device keeps working) and always before a checkpoint of that step is
written, so a checkpoint never holds non-finite parameters.
"""

import jax

from jaxtrain.errors import RunFailure

MODES = ("stop", "skip")


class Guard:

  def __init__(self, mode, max_in_a_row, checkpoint_dir):
    self.mode, self.max_in_a_row, self.checkpoint_dir = mode, max_in_a_row, checkpoint_dir
    self.pending = []  # (step, {"nonfinite", "loss"} still on the device)
    self.skipped = 0  # Non-finite steps skipped by this process.
    self.in_a_row = []
    self.last_saved = None  # Step of the newest checkpoint this run wrote or resumed from.

  def push(self, step, device_metrics):
    self.pending.append((step, {k: device_metrics[k] for k in ("nonfinite", "loss")}))

  def check(self, upto):
    """Fetch the flags of steps <= `upto`; raises RunFailure when the run must stop."""
    while self.pending and self.pending[0][0] <= upto:
      step, flags = self.pending.pop(0)
      flags = jax.device_get(flags)
      if not flags["nonfinite"]:
        self.in_a_row = []
        continue
      if self.mode == "stop":
        raise RunFailure(
            f"non-finite loss or gradients at step {step} (loss={float(flags['loss'])}); stopped "
            f"before saving it: {self._kept()}; lower optimizer.lr, or set "
            "train.on_nonfinite=skip to skip such steps")
      self.skipped += 1
      self.in_a_row.append(step)
      if len(self.in_a_row) >= self.max_in_a_row:
        raise RunFailure(
            f"{len(self.in_a_row)} non-finite steps in a row (steps {self.in_a_row[0]}-{step}, "
            f"train.max_nonfinite_in_a_row={self.max_in_a_row}); stopped: {self._kept()}; "
            "lower optimizer.lr")

  def _kept(self):
    if self.last_saved is None:
      return "no checkpoint was written yet"
    return f"the last checkpoint (step {self.last_saved} in {self.checkpoint_dir}) is finite"
