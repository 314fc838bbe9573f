"""Config files, command-line overrides and validation.

A config file is a Python file with `get_config(arg)` returning an `ml_collections.ConfigDict`;
`load_config("configs/llama.py:125m,h100")` calls it with `"125m,h100"`. Every key has a default
in `base_config()`, so a config file only says what differs. `validate()` checks every value with a
one-line error naming the key before anything is compiled.
"""

import ast
import dataclasses
import importlib.util
import json
import os

import ml_collections

from jaxtrain.errors import UserError


# Targets that `train.hardware` may name ("" = the devices the command runs on).
HARDWARE = ("", "cpu", "a40", "a100", "h100", "h200")


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default. Config files start from this."""
  from jaxtrain import data, distributed, model, optim  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dataclasses.asdict(model.ModelConfig()))
  cfg.data = data.default_config()
  cfg.optimizer = optim.default_config()
  cfg.train = ml_collections.ConfigDict(dict(
      steps=1000,  # Optimizer steps in the whole run (also the schedule's length).
      batch_size=16,  # Global batch, in sequences of data.seq_len tokens.
      # > 0: the global batch is this many sequences per data-parallel device (data x fsdp),
      # resolved against the device count at run time; train.batch_size is then ignored.
      batch_size_per_device=0,
      microbatches=1,  # Gradient accumulation: the batch is split into this many parts.
      seed=0,  # Seed of parameter initialisation.
      log_every=10,  # Steps between metrics.jsonl lines.
      eval_every=200,  # 0: evaluate only at the end.
      eval_batches=16,  # Validation batches per evaluation.
      loss_chunk=0,  # Sequence positions per chunk of the vocabulary-sized loss (0 = automatic).
      progress_bar=True,  # tqdm bar on the terminal (or notebook).
      hardware="",  # Target hardware (cpu, a40, a100, h100, h200): what `info --plan` fits to.
      # A step whose loss, gradients or update are not finite: "stop" (exit code 1 naming the
      # step; it is never saved, the last checkpoint stays finite) or "skip" (its update is
      # dropped inside the step, counted as nonfinite_skipped in metrics.jsonl; training goes on).
      on_nonfinite="stop",
      max_nonfinite_in_a_row=10,  # With on_nonfinite=skip: this many skipped in a row stop the run.
  ))
  cfg.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # Data-parallel size (-1: the devices the other axes leave).
      fsdp=1,  # Parameters, gradients and optimizer state sharded over this many devices.
      tensor=1,  # Tensor parallelism: heads, MLP width and vocabulary split.
      # Multi-node jobs: the part of mesh.data that crosses nodes (-1: every node). Each mesh.X
      # is the whole axis; mesh.dcn_X of it goes across nodes, the rest within a node.
      dcn_data=-1,
      dcn_fsdp=1,  # Part of mesh.fsdp across nodes (1: FSDP stays inside a node).
      dcn_tensor=1,  # Part of mesh.tensor across nodes (1: tensor parallelism inside a node).
  ))
  cfg.checkpoint = ml_collections.ConfigDict(dict(
      every=500,  # Steps between checkpoints (one is also saved at the end and on SIGTERM).
      keep=2,  # Checkpoints kept; older ones are deleted.
      async_save=True,  # Write checkpoints in the background while training goes on.
  ))
  cfg.distributed = distributed.default_config()  # Several processes: docs/scaling.md.
  return cfg


def _load_module(path):
  if not os.path.isfile(path):
    raise UserError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"jaxtrain_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # A broken config file is the user's input: one line, exit 2.
    raise UserError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} has no get_config(arg) function")
  return module


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """`path.py` or `path.py:arg` -> ConfigDict (not yet validated).

  `overrides`: (dotted key, text) pairs applied in order with `apply_override`, as the CLI's
  `--config.KEY=VALUE` flags are.
  """
  path, _, arg = spec.partition(":")
  module = _load_module(path)
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except TypeError:
    cfg = module.get_config(arg)
  except UserError:
    raise
  except Exception as e:
    raise UserError(f"config {spec}: {type(e).__name__}: {e}") from e
  for key, value in overrides:
    apply_override(cfg, key, value)
  return cfg


def _parse_value(key, text, current):
  if isinstance(current, bool):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise UserError(f"--config.{key}={text!r} is not a boolean")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise UserError(f"--config.{key}={text!r} is not an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise UserError(f"--config.{key}={text!r} is not a number") from None
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(cfg, dotted_key: str, text: str):
  """`--config.train.steps=10`: set an existing key, parsed to the type of its default."""
  *parents, leaf = dotted_key.split(".")
  node = cfg
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise UserError(f"config key {'.'.join(parents[:i + 1])} does not exist")
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise UserError(f"config key {dotted_key} does not exist")
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(f"config key {dotted_key} is a section; set one of its keys")
  value = _parse_value(dotted_key, text, current)
  try:
    with node.unlocked():
      node[leaf] = value
  except (TypeError, ValueError, KeyError) as e:  # ml_collections refuses a change of type.
    kind = type(current).__name__
    raise UserError(f"--config.{dotted_key}={text!r} does not fit the key's type ({kind}, e.g. "
                    f"{current!r})") from e


def load_config_dict(values) -> ml_collections.ConfigDict:
  """A config from a (possibly older, partial) dict: its values over today's defaults, so old
  workdirs' config.json load after new keys appear."""
  cfg = base_config()
  _merge(cfg, values)
  return cfg


def _merge(cfg, values):
  with cfg.unlocked():
    for key, value in values.items():
      if key in cfg and hasattr(cfg[key], "keys") and hasattr(value, "keys"):
        _merge(cfg[key], value)
      else:
        cfg[key] = value


def flat_items(tree, prefix=""):
  """(dotted key, value) of every leaf of a config or nested dict; an empty dict is a leaf."""
  for key, value in tree.items():
    if hasattr(value, "items") and len(value):
      yield from flat_items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def to_json(cfg) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def _check_known_keys(cfg, reference, prefix=""):
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      raise UserError(f"config key {name} is unknown")
    if isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise UserError(f"config key {name} must be a section")
      _check_known_keys(cfg[key], reference[key], name + ".")


def _positive_int(section, key, value, zero_ok=False):
  ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
  if not ok:
    need = "a non-negative" if zero_ok else "a positive"
    raise UserError(f"{section}.{key} must be {need} integer, got {value!r}")


def resolve(cfg, num_devices):
  """The config a run on `num_devices` devices uses: `train.batch_size` from
  `train.batch_size_per_device` when that is set (a copy; the input is not changed)."""
  from jaxtrain import sharding  # pylint: disable=import-outside-toplevel
  per_device = cfg.train.batch_size_per_device
  if not per_device:
    return cfg
  _positive_int("train", "batch_size_per_device", per_device, zero_ok=True)
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, num_devices)))
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.train.batch_size = per_device * shape["data"] * shape["fsdp"]
  return cfg


def validate(cfg, num_devices=None):
  """Check every value; returns the ModelConfig. Errors are one line naming the key."""
  from jaxtrain import data, distributed, model, optim, sharding  # pylint: disable=import-outside-toplevel
  _check_known_keys(cfg, base_config())
  distributed.validate_config(cfg.distributed)
  sharding.dcn_shape(cfg.mesh, None)
  model_cfg = model.ModelConfig.from_config(cfg.model)
  data.validate_config(cfg.data)
  optim.validate_config(cfg.optimizer)
  t = cfg.train
  for key in ("steps", "batch_size", "microbatches", "log_every", "eval_batches"):
    _positive_int("train", key, t[key])
  for key in ("seed", "eval_every", "loss_chunk", "batch_size_per_device"):
    _positive_int("train", key, t[key], zero_ok=True)
  for key in ("every", "keep"):
    _positive_int("checkpoint", key, cfg.checkpoint[key])
  _positive_int("train", "max_nonfinite_in_a_row", t.max_nonfinite_in_a_row)
  if t.on_nonfinite not in ("stop", "skip"):
    raise UserError(f"train.on_nonfinite={t.on_nonfinite!r} is not 'stop' or 'skip'")
  if t.hardware not in HARDWARE:
    raise UserError(f"train.hardware={t.hardware!r} is not one of {', '.join(map(repr, HARDWARE))}")
  if cfg.data.seq_len > model_cfg.max_seq_len:
    raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len="
                    f"{model_cfg.max_seq_len}")
  if t.batch_size % t.microbatches:
    raise UserError(f"train.batch_size={t.batch_size} is not divisible by "
                    f"train.microbatches={t.microbatches}")
  if num_devices is not None:
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, num_devices)))
    dp = shape["data"] * shape["fsdp"]
    micro = t.batch_size // t.microbatches
    if micro % dp:
      raise UserError(f"train.batch_size={t.batch_size} (per microbatch {micro}) is not divisible "
                      f"by the data-parallel size data*fsdp={dp}")
  return model_cfg
