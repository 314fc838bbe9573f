"""jaxtrain: pretrain LLaMA models with Muon in JAX.

The Python API the CLI and the notebooks share:

  cfg = jaxtrain.load_config("configs/llama.py:35m")
  jaxtrain.train(cfg, "runs/x")
  model, tokenizer = jaxtrain.load_model("runs/x")   # or an HF LLaMA directory
  logits_BTV = model(tokens_BT)                       # fp32
  jaxtrain.plan(cfg, devices=8)                       # XLA's per-device memory and FLOPs
  outs = jaxtrain.generate(model, ["def "], max_new_tokens=32, tokenizer=tokenizer)
  outs[0].tokens, outs[0].text
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


def generate(model, prompts, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=0,
             tokenizer=None, **kwargs):
  """Complete prompts (token-id lists, or strings with a tokenizer); see
  `jaxtrain.serving.engine.generate`. Returns one result per prompt with `.tokens` (new ids),
  `.text` (with a tokenizer) and `.finish_reason`."""
  from jaxtrain.serving import engine  # pylint: disable=import-outside-toplevel
  return engine.generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, tokenizer=tokenizer, **kwargs)


__all__ = ["load_config", "train", "plan", "load_model", "generate", "UserError"]
