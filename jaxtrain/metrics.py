"""Throughput numbers (tokens/s, TFLOP/s per device, MFU) and where metrics are written.

`WORKDIR/metrics.jsonl` holds one JSON object per logged step (train lines: step, loss, lr,
grad_norm, tokens_per_sec, tflops_per_device, mfu, elapsed_sec; eval lines add split, eval_loss,
bits_per_byte). The same scalars go to TensorBoard event files in `WORKDIR/tb`.
"""

import json
import math
import os

import numpy as np


class Throughput:
  """Turns (tokens, seconds) into tokens/s, model TFLOP/s per device and MFU."""

  def __init__(self, flops_per_token, num_devices, peak_tflops):
    self.flops_per_token = flops_per_token
    self.num_devices = num_devices
    self.peak_tflops = peak_tflops

  def __call__(self, tokens, seconds):
    tokens_per_sec = tokens / seconds if seconds > 0 else float("nan")
    tflops = tokens_per_sec * self.flops_per_token / self.num_devices / 1e12
    mfu = tflops / self.peak_tflops if self.peak_tflops else float("nan")
    return {"tokens_per_sec": tokens_per_sec, "tflops_per_device": tflops, "mfu": mfu}


def _clean(value):
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else value
  return value


class MetricsWriter:
  """Appends to metrics.jsonl (resume keeps earlier lines) and TensorBoard, rank 0 only."""

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._end_partial_line()
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        self._tb = None

  def _end_partial_line(self):
    """A write cut short (full disk, kill) leaves half a line: end it, so that the next record
    starts a line of its own (`read_metrics` skips the half one)."""
    try:
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        partial = f.read(1) != b"\n"
    except (FileNotFoundError, OSError):  # No file, or an empty one (seek before the start).
      return
    if partial:
      with open(self.path, "a") as f:
        f.write("\n")

  def write(self, record):
    if not self.enabled:
      return
    record = {k: _clean(v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      step = record["step"]
      prefix = record.get("split", "train")
      for key, value in record.items():
        if key not in ("step", "split") and isinstance(value, (int, float)):
          self._tb.add_scalar(f"{prefix}/{key}", value, step)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def write_atomically(path, text):
  """Write, then rename: a kill or a full disk leaves the old file or the new one, never half
  of one (config.json, run.json and eval.json are read by later commands)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_run_info(workdir, info):
  """`WORKDIR/run.json`: the hardware and the numbers MFU was computed from, for `compare`."""
  write_atomically(os.path.join(workdir, "run.json"),
                   json.dumps({k: _clean(v) for k, v in info.items()}, indent=2))


def read_run_info(workdir):
  path = os.path.join(workdir, "run.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_metrics(workdir_or_file):
  path = workdir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # Blank, or half a line left by a write cut short.
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def plot_loss_curve(workdir, out_name="loss.png"):
  """Train and eval loss against step, from metrics.jsonl; returns the PNG path."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  records = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if "loss" in r and "split" not in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train")
  if evals:
    ax.plot(*zip(*evals), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(os.path.basename(os.path.abspath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, out_name)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
