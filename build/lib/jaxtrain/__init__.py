"""jaxtrain: pretrain LLaMA models with Muon in JAX.

The Python API the CLI and the notebooks share:

  cfg = jaxtrain.load_config("configs/llama.py:35m")
  jaxtrain.train(cfg, "runs/x")
  model, tokenizer = jaxtrain.load_model("runs/x")   # or an HF LLaMA directory
  logits_BTV = model(tokens_BT)                       # fp32
  jaxtrain.plan(cfg, devices=8)                       # XLA's per-device memory and FLOPs
"""

from jaxtrain.config import load_config
from jaxtrain.errors import UserError


def train(config, workdir, **kwargs):
  """Train (or resume) the run in `workdir`; see `jaxtrain.trainer.train`."""
  from jaxtrain import trainer as train_lib  # pylint: disable=import-outside-toplevel
  return train_lib.train(config, workdir, **kwargs)


def plan(config, devices=None, **kwargs):
  """XLA's per-device memory and FLOPs of the training step on N devices; see `jaxtrain.planner.plan`."""
  from jaxtrain import planner as plan_lib  # pylint: disable=import-outside-toplevel
  return plan_lib.plan(config, devices=devices, **kwargs)


def load_model(path, step=None):
  """(model, tokenizer) from a workdir (latest checkpoint, or `step`) or an HF LLaMA directory."""
  from jaxtrain import evaluate  # pylint: disable=import-outside-toplevel
  return evaluate.load_model(path, step=step)


__all__ = ["load_config", "train", "plan", "load_model", "UserError"]
