"""Load any checkpoint as a model, and evaluate it: loss, perplexity, bits per byte.

A workdir is recognised by its `checkpoints/` folder, an HF LLaMA directory by a `config.json`
with `model_type`. Params are restored alone (no optimizer state), onto this process's devices,
whatever mesh wrote them.
"""

import json
import math
import os

import jax
from flax import nnx

from jaxtrain import checkpoint as checkpoint_lib
from jaxtrain import config as config_lib, metrics as metrics_lib, model as model_lib
from jaxtrain import sharding
from jaxtrain.errors import UserError


def _workdir_config(workdir, overrides=()):
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist: not a jaxtrain workdir")
  try:
    with open(path) as f:
      values = json.load(f)
  except (OSError, ValueError) as e:  # E.g. emptied by a full disk: every checkpoint has it.
    problem = f"{path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:80]})"
    step, values = checkpoint_lib.newest_config(os.path.join(workdir, "checkpoints"))
    if values is None:
      raise UserError(f"{problem} and no checkpoint holds the run's config") from None
    checkpoint_lib.warn_stderr(f"{problem}; using the config saved with checkpoint {step}")
  cfg = config_lib.load_config_dict(values)
  for key, value in overrides:
    config_lib.apply_override(cfg, key, value)
  return cfg


def is_hf_dir(path):
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config) or os.path.isdir(os.path.join(path, "checkpoints")):
    return False
  try:
    with open(config) as f:
      return "model_type" in json.load(f)
  except (OSError, ValueError, TypeError):  # unreadable: not recognisably HF (the workdir path
    return False                            # then names the file in its error)


def _resolve_step(ckpt, step, workdir):
  if step not in ckpt.all_steps():
    raise UserError(f"{workdir}/checkpoints has no step {step} (have {sorted(ckpt.all_steps())})")
  reason = checkpoint_lib.check_step(ckpt.directory, step)
  if reason is not None:
    raise UserError(f"{workdir}/checkpoints step {step} is invalid: {reason}")
  return step


def load_params(workdir, abstract_params, step=None):
  """Restore params only, onto the shardings carried by `abstract_params`."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"{directory} does not exist: no checkpoints in this workdir")
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    if step is None:  # The newest step that passes its checks and restores (others named).
      step, restored = ckpt.restore_latest(abstract_params)
      if step is None:
        raise UserError(f"{workdir}/checkpoints holds no checkpoint")
      return step, restored["params"]
    step = _resolve_step(ckpt, step, workdir)
    return step, ckpt.restore_params(step, abstract_params)
  finally:
    ckpt.close()


def _tokenizer_in(directory):
  """The tokenizer saved in a directory (tokenizer.json or a sentencepiece .model), or None."""
  from jaxtrain.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(directory):
    return None
  names = os.listdir(directory)
  if "tokenizer.json" in names or any(n.endswith(".model") for n in names):
    return tokenizer_lib.Tokenizer.load(directory)
  return None


def load_model(path, step=None):
  """(model, tokenizer or None) from a workdir or an HF LLaMA directory."""
  if not os.path.isdir(path):
    raise UserError(f"{path} is not a directory (expected a workdir or an HF LLaMA directory)")
  if is_hf_dir(path):
    if step is not None:
      raise UserError(f"{path} is an HF directory: it has no checkpoint steps (--step)")
    from jaxtrain import convert  # pylint: disable=import-outside-toplevel
    model, _ = convert.load_hf(path)
    tokenizer_dir = path
  else:
    cfg = _workdir_config(path)
    model_cfg = model_lib.ModelConfig.from_config(cfg.model)
    abstract = model_lib.abstract_model(model_cfg)
    graphdef, abstract_params = model_lib.params_of(abstract)
    # Sharded (FSDP) over this process's devices, read straight into place: a model larger than
    # one device's memory loads, and no device holds a copy of every parameter.
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.local_devices())
    target = checkpoint_lib.abstract_with_shardings(
        abstract_params, sharding.param_shardings(model_lib.logical_axes(abstract),
                                                  abstract_params, mesh))
    _, params = load_params(path, target, step)
    model = nnx.merge(graphdef, params)
    tokenizer_dir = os.path.join(path, "tokenizer")
  tokenizer = _tokenizer_in(tokenizer_dir)
  return model, tokenizer


def checkpoint_steps(workdir):
  """The steps saved in a workdir's checkpoints/, ascending."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"{directory} does not exist: no checkpoints in this workdir")
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def _use_the_run_tokenizer(cfg, workdir, other_data):
  """Evaluate with the ids the run trained on. A BPE tokenizer is trained per corpus: other
  data (`--config.data.source=...`) or a corpus changed since training would get another one,
  and the loss would be measured on ids that mean other text. Then the data is tokenized with
  the run's saved tokenizer instead; so it is when config.json names a tokenizer file that is
  gone (a workdir converted from HF, then moved)."""
  from jaxtrain import data  # pylint: disable=import-outside-toplevel
  from jaxtrain.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  saved = os.path.join(workdir, "tokenizer")
  path = tokenizer_lib.saved_file(saved)
  if path is None:
    return
  if cfg.data.tokenizer != "bpe":  # a file: gone if the workdir (converted from HF) was moved
    if not os.path.exists(os.path.expanduser(cfg.data.tokenizer)):
      with cfg.unlocked():
        cfg.data.tokenizer = str(path)
    return
  vocab = cfg.model.vocab_size
  if (other_data or not data.is_prepared(cfg.data, vocab) or
      not tokenizer_lib.same_as_saved(data.load_tokenizer(cfg.data, vocab), saved)):
    with cfg.unlocked():
      cfg.data.tokenizer = str(path)


def evaluate_workdir(workdir, split="validation", max_batches=None, step=None, overrides=()):
  """Loss, perplexity and bits per byte of a workdir's checkpoint on a split of its data (or of
  other data, with `--config.data.source=...` overrides)."""
  return evaluate_steps(workdir, [step], split, max_batches, overrides)[0]


def evaluate_steps(workdir, steps, split="validation", max_batches=None, overrides=()):
  """`evaluate_workdir` for several checkpoint steps (None: the latest), one compile for all:
  validation loss against training tokens. Each result adds `train_tokens` (step x global
  batch x sequence length of the run). Of several steps, one that does not restore is named in
  a warning and left out of the results (a single step raises)."""
  from jaxtrain import data, trainer as train_lib  # pylint: disable=import-outside-toplevel
  cfg = _workdir_config(workdir, overrides)
  _use_the_run_tokenizer(cfg, workdir, other_data=any(k.startswith("data.") for k, _ in overrides))
  have = checkpoint_steps(workdir)
  missing = [st for st in steps if st is not None and st not in have]
  if missing:
    raise UserError(f"{workdir}/checkpoints has no step {missing[0]} (have {have})")
  train_batch, seq_len = cfg.train.batch_size, cfg.data.seq_len
  # Evaluation runs data-parallel over this machine's devices, whatever mesh trained the model:
  # the eval batch is the training microbatch rounded up to a multiple of the device count.
  n = jax.device_count()
  batch = -(-(cfg.train.batch_size // cfg.train.microbatches) // n) * n
  with cfg.unlocked():
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    cfg.train.update(batch_size=batch, batch_size_per_device=0, microbatches=1)
  s = train_lib.make_setup(cfg)
  eval_step = train_lib.make_eval_step(s)  # jitted once: every step has the same shapes
  results = []
  for step in steps:
    try:
      step, params = load_params(workdir, s.abstract_state.params, step)
    except UserError as e:
      if len(steps) == 1:
        raise
      checkpoint_lib.warn_stderr(f"{e}; evaluating the other steps")
      continue
    batches = data.eval_iterator(cfg.data, s.model_config.vocab_size,
                                 batch // jax.process_count(), split=split,
                                 max_batches=max_batches or cfg.train.eval_batches)
    with jax.set_mesh(s.mesh):
      result = train_lib.evaluate_params(s, eval_step, params, batches)
    results.append({"step": step, "split": split, "loss": result["eval_loss"],
                    "perplexity": math.exp(min(result["eval_loss"], 50.0)),
                    "bits_per_byte": result["bits_per_byte"],
                    "tokens": int(result["eval_tokens"]),
                    "train_tokens": int(step) * int(train_batch) * int(seq_len)})
  return results


def write_eval_json(workdir, results):
  """Merge results into WORKDIR/eval.json ({"results": [...]}, one entry per (step, split),
  sorted by step; a re-evaluation replaces its entry). Returns the path."""
  path = os.path.join(workdir, "eval.json")
  entries = {}
  if os.path.isfile(path):
    try:
      with open(path) as f:
        for r in json.load(f).get("results", []):
          entries[(r["step"], r["split"])] = r
    except (ValueError, KeyError, AttributeError):
      entries = {}  # A damaged file is rewritten from these results.
  for r in results:
    entries[(r["step"], r["split"])] = r
  ordered = [entries[k] for k in sorted(entries, key=lambda k: (k[0], k[1]))]
  metrics_lib.write_atomically(path, json.dumps({"results": ordered}, indent=1) + "\n")
  return path
