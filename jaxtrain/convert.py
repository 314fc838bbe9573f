"""HF LLaMA checkpoints (config.json + safetensors + tokenizer) to and from jaxtrain.

jaxtrain's model follows HF transformers' `LlamaForCausalLM` conventions (rotary embeddings on the
two halves of each head, RMSNorm without biases), so every tensor converts by a transpose and a
reshape; no permutation is involved. Meta's original `consolidated.*.pth` files rotate interleaved
pairs instead; `permute_interleaved_to_half` turns their q/k projections into the HF layout.

Neither torch nor transformers is imported: safetensors files are read and written with numpy,
tensor by tensor, and the loaded params are merged into the abstract model, so a model is never
randomly initialised only to be overwritten.

A jaxtrain workdir made from an HF directory holds `config.json` (the full jaxtrain config),
a params-only checkpoint at step 0 in `checkpoints/`, the tokenizer files in `tokenizer/`, and the
source's `config.json`/`generation_config.json` in `hf_source/`, from which the export takes the
special token ids that jaxtrain's config does not model.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxtrain import model as model_lib
from jaxtrain.errors import UserError

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' long-standing default, "5GB".
SAFETENSORS_FILE = "model.safetensors"
# Pickle-based checkpoints (torch.save, pickle): refused, never opened (see _tensor_files).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")
HF_SOURCE_DIR = "hf_source"  # Inside a workdir: the HF metadata files the import started from.
# Keys of config.json that jaxtrain's config does not describe but an export should carry over.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Buffers that old transformers versions saved; derived from the config, safe to drop.
_IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors names; cast to the params' dtype.

# Every tensor as (jaxtrain params path, HF name with {i} for the layer, in_axes). in_axes is the
# number of leading input axes of the jaxtrain kernel (HF Linear weights are (out, in), ours are
# (in..., out...)); None marks a tensor copied as is (embedding table, norm scales).
_BLOCK_TENSORS = (
    (("blocks", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", None),
    (("blocks", "attn", "wq"), "model.layers.{i}.self_attn.q_proj.weight", 1),
    (("blocks", "attn", "wk"), "model.layers.{i}.self_attn.k_proj.weight", 1),
    (("blocks", "attn", "wv"), "model.layers.{i}.self_attn.v_proj.weight", 1),
    (("blocks", "attn", "wo"), "model.layers.{i}.self_attn.o_proj.weight", 2),
    (("blocks", "mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", None),
    (("blocks", "mlp", "w_gate"), "model.layers.{i}.mlp.gate_proj.weight", 1),
    (("blocks", "mlp", "w_up"), "model.layers.{i}.mlp.up_proj.weight", 1),
    (("blocks", "mlp", "w_down"), "model.layers.{i}.mlp.down_proj.weight", 1),
)
_EMBED = (("embed", "embedding"), "model.embed_tokens.weight", None)
_FINAL_NORM = (("final_norm", "scale"), "model.norm.weight", None)
_LM_HEAD = (("lm_head", "kernel"), "lm_head.weight", 1)


# ---------------------------------------------------------------------------------------------
# Configs.


def _rope_from_hf(hf):
  """(rope_theta, llama3 scaling fields) from either config generation.

  transformers < 5 writes `rope_theta` and `rope_scaling` side by side; transformers >= 5 writes
  one `rope_parameters` dict holding both. Like transformers, `rope_scaling` wins when both exist.
  """
  where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  rope = dict(hf.get(where) or {})
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise UserError(f"config.json partial_rotary_factor={partial} is not supported (rotary "
                    "embeddings cover whole heads in jaxtrain)")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return theta, {}
  if rope_type != "llama3":
    raise UserError(f"config.json {where}.rope_type={rope_type!r} is not supported "
                    "(only 'default' and 'llama3')")
  fields = {}
  for hf_key, key in (("factor", "rope_scaling_factor"),
                      ("low_freq_factor", "rope_low_freq_factor"),
                      ("high_freq_factor", "rope_high_freq_factor"),
                      ("original_max_position_embeddings", "rope_original_max_seq_len")):
    if rope.get(hf_key) is None:
      raise UserError(f"config.json {where}.{hf_key} is missing (llama3 rope scaling needs it)")
    fields[key] = rope[hf_key]
  fields["rope_original_max_seq_len"] = int(fields["rope_original_max_seq_len"])
  for key in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
    fields[key] = float(fields[key])
  return theta, fields


def config_from_hf(hf_config) -> model_lib.ModelConfig:
  """ModelConfig from an HF LlamaConfig (the dict of its config.json, or the object itself).

  Anything the jaxtrain model cannot reproduce exactly (biases, other activations, other rope
  types, quantized weights, other architectures) is refused, naming the key, rather than loaded
  into a model that would silently compute something else.
  """
  hf = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
  model_type = hf.get("model_type")
  if model_type != "llama":
    raise UserError(f"config.json model_type={model_type!r} is not supported (only 'llama')")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise UserError(f"config.json {key}=true is not supported (jaxtrain's LLaMA has no biases)")
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"config.json hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
  if hf.get("quantization_config"):
    raise UserError("config.json quantization_config: quantized checkpoints are not supported")

  def need(key):
    if hf.get(key) is None:
      raise UserError(f"config.json has no {key}")
    try:
      return int(hf[key])
    except (TypeError, ValueError):
      raise UserError(f"config.json {key}={hf[key]!r} is not an integer") from None

  d_model, n_heads = need("hidden_size"), need("num_attention_heads")
  n_kv_heads = int(hf.get("num_key_value_heads") or n_heads)
  head_dim = int(hf.get("head_dim") or 0)
  if n_heads and head_dim == d_model // n_heads and d_model % n_heads == 0:
    head_dim = 0  # jaxtrain's spelling of the default.
  theta, rope_fields = _rope_from_hf(hf)
  cfg = model_lib.ModelConfig(
      vocab_size=need("vocab_size"), d_model=d_model, n_layers=need("num_hidden_layers"),
      n_heads=n_heads, n_kv_heads=0 if n_kv_heads == n_heads else n_kv_heads,
      d_ff=need("intermediate_size"), head_dim=head_dim,
      max_seq_len=int(hf.get("max_position_embeddings") or 2048), rope_theta=theta,
      norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range") or 0.02), **rope_fields)
  try:
    cfg.validate()
  except UserError as e:
    raise UserError(f"config.json gives an invalid model: {e}") from None
  return cfg


def config_to_hf(cfg: model_lib.ModelConfig, dtype=None) -> dict:
  """The config.json of the equivalent `LlamaForCausalLM`.

  Rope settings use the `rope_theta` + `rope_scaling` keys that every transformers version reads
  (version 5 converts them to `rope_parameters` on load), and the dtype goes under both its old
  (`torch_dtype`) and new (`dtype`) names. Special token ids are unknown here: None, unless the
  caller merges them in (see `save_hf(extra_config=...)`).
  """
  dtype = _dtype_name(dtype or cfg.param_dtype)
  rope_scaling = None
  if cfg.rope_scaling_factor:
    rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                    "low_freq_factor": cfg.rope_low_freq_factor,
                    "high_freq_factor": cfg.rope_high_freq_factor,
                    "original_max_position_embeddings": cfg.rope_original_max_seq_len}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
      "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
      "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
  }


def _dtype_name(dtype):
  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in model_lib.DTYPES:
    raise UserError(f"dtype {name!r} is not one of {sorted(model_lib.DTYPES)}")
  return name


def _read_json(path, what):
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist ({what})")
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------
# The tensor layout shared by loading and saving.


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor and where it lives in jaxtrain's params (layer None: not stacked)."""
  hf_name: str
  path: tuple
  layer: int | None
  in_axes: int | None
  shape: tuple  # jaxtrain layout, without the layer axis.

  @property
  def hf_shape(self):
    if self.in_axes is None:
      return self.shape
    return (math.prod(self.shape[self.in_axes:]), math.prod(self.shape[:self.in_axes]))

  def from_hf(self, w):
    """HF (out, in) weight -> jaxtrain (in..., out...) kernel."""
    return w if self.in_axes is None else w.T.reshape(self.shape)

  def to_hf(self, x):
    return x if self.in_axes is None else x.reshape(self.hf_shape[::-1]).T


def _leaves(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _layout(cfg, abstract_params):
  """Every HF tensor of this config, in HF's saving order (embedding, layer by layer, head)."""
  shapes = {path: tuple(leaf.shape) for path, leaf in _leaves(abstract_params)}
  globals_ = [_EMBED, _FINAL_NORM] + ([] if cfg.tie_embeddings else [_LM_HEAD])
  covered = {spec[0] for spec in globals_ + list(_BLOCK_TENSORS)}
  if covered != set(shapes):  # The model grew or lost a parameter: the tables above must follow.
    raise RuntimeError(f"convert.py does not map params {sorted(set(shapes) ^ covered)}")

  def unstacked(spec):
    path, name, in_axes = spec
    return _Tensor(name, path, None, in_axes, shapes[path])

  tensors = [unstacked(_EMBED)]
  for i in range(cfg.n_layers):
    for path, name, in_axes in _BLOCK_TENSORS:
      tensors.append(_Tensor(name.format(i=i), path, i, in_axes, shapes[path][1:]))
  return tensors + [unstacked(spec) for spec in globals_[1:]]


# ---------------------------------------------------------------------------------------------
# Loading.


def _tensor_files(hf_dir):
  """({tensor name: file name}, the file listing them) of a single-file or sharded checkpoint.

  Like transformers, a single model.safetensors wins over an index.
  """
  single = os.path.join(hf_dir, SAFETENSORS_FILE)
  index_path = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(single):
    return {name: SAFETENSORS_FILE for name in _safetensors_names(single)}, SAFETENSORS_FILE
  if os.path.isfile(index_path):
    index = _read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
      raise UserError(f"{index_path} has no weight_map")
    for file in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(hf_dir, file)):
        raise UserError(f"{index_path} names {file}, which does not exist")
    return dict(weight_map), INDEX_FILE
  pickles = sorted(n for n in os.listdir(hf_dir) if n.endswith(PICKLE_SUFFIXES))
  hint = (f" (found {pickles[0]}: a pickle checkpoint, which jaxtrain never loads because "
          "unpickling can run code; convert it once, on a machine where you trust the file: "
          "python -c \"import sys, transformers; transformers.AutoModelForCausalLM.from_pretrained("
          "sys.argv[1]).save_pretrained(sys.argv[2], safe_serialization=True)\" "
          f"{hf_dir} {hf_dir}-safetensors)") if pickles else ""
  raise UserError(f"{hf_dir} has neither {SAFETENSORS_FILE} nor {INDEX_FILE}{hint}")


def _safetensors_names(path):
  """Tensor names in a safetensors file; a damaged file is a one-line UserError."""
  try:
    with safe_open(path, framework="numpy") as f:
      return list(f.keys())
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
    raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:200]})") from None


def _check_tensor_names(hf_dir, files, listing, tensors, cfg):
  expected = {t.hf_name for t in tensors}
  allowed = set(expected)
  if cfg.tie_embeddings:
    allowed.add(_LM_HEAD[1])  # Some tied checkpoints store the head anyway; checked equal below.
  missing = [t.hf_name for t in tensors if t.hf_name not in files]
  unexpected = sorted(n for n in files if n not in allowed and not _IGNORED_TENSORS.fullmatch(n))
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise UserError(f"{hf_dir}/{listing}: tensor {missing[0]} is missing{more}")
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise UserError(f"{hf_dir}/{files[unexpected[0]]}: unexpected tensor {unexpected[0]}{more}: "
                    "not part of a LlamaForCausalLM with this config.json")


def _read_params(hf_dir, cfg, abstract_params):
  """Params pure dict (numpy, the abstract params' dtypes) read from the safetensors files.

  Checks every name, shape and dtype from the file headers before reading any tensor data, so
  a wrong file fails in a second, whatever its size. Stacked tensors are filled layer by layer
  into one preallocated array: host memory peaks at the model's size plus one tensor.
  """
  files, listing = _tensor_files(hf_dir)
  tensors = _layout(cfg, abstract_params)
  _check_tensor_names(hf_dir, files, listing, tensors, cfg)
  reading = [listing]  # the file being read, for the message when it turns out damaged
  try:
    return _read_tensors(hf_dir, cfg, abstract_params, files, tensors, reading)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
    raise UserError(f"{hf_dir}/{reading[0]} is not a readable safetensors file "
                    f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def _read_tensors(hf_dir, cfg, abstract_params, files, tensors, reading):
  with contextlib.ExitStack() as stack:
    handles, contents = {}, {}

    def reader(name):
      file = reading[0] = files[name]
      if file not in handles:
        handles[file] = stack.enter_context(
            safe_open(os.path.join(hf_dir, file), framework="numpy"))
        contents[file] = set(handles[file].keys())
      if name not in contents[file]:
        raise UserError(f"{hf_dir}/{file} does not contain tensor {name} ({INDEX_FILE} says it "
                        "does)")
      return handles[file]

    for t in tensors:
      view = reader(t.hf_name).get_slice(t.hf_name)
      shape, dtype = tuple(view.get_shape()), view.get_dtype()
      if shape != t.hf_shape:
        raise UserError(f"{hf_dir}/{files[t.hf_name]}: tensor {t.hf_name} has shape {shape}, "
                        f"config.json implies {t.hf_shape}")
      if dtype not in _FLOAT_DTYPES:
        raise UserError(f"{hf_dir}/{files[t.hf_name]}: tensor {t.hf_name} has dtype {dtype}; "
                        f"only floating point ({', '.join(_FLOAT_DTYPES)}) is supported")

    params = {}
    for path, leaf in _leaves(abstract_params):
      _set(params, path, np.empty(leaf.shape, leaf.dtype))
    for t in tensors:
      value = t.from_hf(reader(t.hf_name).get_tensor(t.hf_name))
      target = _get(params, t.path)
      if t.layer is None:
        target[...] = value
      else:
        target[t.layer] = value

    head = _LM_HEAD[1]
    if cfg.tie_embeddings and head in files:
      embedding = _get(params, _EMBED[0])
      if not np.array_equal(reader(head).get_tensor(head).astype(embedding.dtype), embedding):
        raise UserError(f"{hf_dir}/{files[head]}: tensor {head} differs from "
                        f"{_EMBED[1]} but config.json sets tie_word_embeddings=true")
  return params


def load_hf(path, dtype=None):
  """(model, ModelConfig) from an HF LLaMA directory (config.json + safetensors).

  Params are fp32 unless `dtype` ("bfloat16", jnp.bfloat16, ...) says otherwise; it sets both
  the parameter and the compute dtype. fp32 is the default because jaxtrain trains fp32 master
  weights and widening bf16/fp16 checkpoints is exact.
  """
  cfg = config_from_hf(_read_json(os.path.join(path, "config.json"), "an HF LLaMA directory"))
  if dtype is not None:
    name = _dtype_name(dtype)
    cfg = dataclasses.replace(cfg, dtype=name, param_dtype=name)
  graphdef, abstract_params = model_lib.params_of(model_lib.abstract_model(cfg))
  params = _read_params(path, cfg, abstract_params)
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params)), cfg


# ---------------------------------------------------------------------------------------------
# Saving.


def _host(x):
  """A numpy copy, gathered from every process when the array spans hosts."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _plan_shards(tensors, itemsize, max_shard_bytes):
  """Consecutive groups of tensors, each under `max_shard_bytes` unless one tensor alone is not."""
  shards, current, size = [], [], 0
  for t in tensors:
    nbytes = math.prod(t.hf_shape) * itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(t)
    size += nbytes
  shards.append(current)
  return shards


def save_hf(model_or_params, cfg, out_dir, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, dtype=None,
            extra_config=None, generation_config=None):
  """Write `out_dir` as an HF `LlamaForCausalLM` directory; returns the file names written.

  `model_or_params`: a jaxtrain model (then `cfg` may be None) or its params pure dict.
  Tensors keep the params' dtype unless `dtype` is given. Above `max_shard_bytes` the weights
  are split into `model-0000k-of-0000n.safetensors` files with `model.safetensors.index.json`,
  as transformers does; older `model*.safetensors` files in `out_dir` are removed so that a
  stale shard is never picked up. With tied embeddings no `lm_head.weight` is written.
  `extra_config` adds keys jaxtrain does not model (special token ids) to config.json;
  `generation_config` is written as generation_config.json, else one is derived from the token
  ids when they are known.
  """
  if isinstance(model_or_params, nnx.Module):
    cfg = cfg or model_or_params.config
    _, params = model_lib.params_of(model_or_params)
  else:
    params = model_or_params
  if cfg is None:
    raise UserError("save_hf needs the ModelConfig when given params")
  _, abstract_params = model_lib.params_of(model_lib.abstract_model(cfg))
  for path, leaf in _leaves(abstract_params):
    try:
      shape = tuple(_get(params, path).shape)
    except (KeyError, TypeError):
      raise UserError(f"params have no {'/'.join(path)}, which the model config needs") from None
    if shape != tuple(leaf.shape):
      raise UserError(f"param {'/'.join(path)} has shape {shape}, the config implies {leaf.shape}")
  tensors = _layout(cfg, abstract_params)
  dtype_name = _dtype_name(dtype or _get(params, _EMBED[0]).dtype)
  np_dtype = np.dtype(model_lib.DTYPES[dtype_name])

  hf_config = config_to_hf(cfg, dtype_name)
  for key, value in (extra_config or {}).items():
    if key in hf_config and key not in TOKEN_ID_KEYS and hf_config[key] != value:
      raise UserError(f"extra_config key {key} would change the model; set it in the model config")
    hf_config[key] = value
  if generation_config is None and any(hf_config[k] is not None for k in TOKEN_ID_KEYS):
    generation_config = {"_from_model_config": True,
                         **{k: hf_config[k] for k in TOKEN_ID_KEYS if hf_config[k] is not None}}

  shards = _plan_shards(tensors, np_dtype.itemsize, max_shard_bytes)
  if len(shards) == 1:
    names = [SAFETENSORS_FILE]
  else:
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  os.makedirs(out_dir, exist_ok=True)
  for file in os.listdir(out_dir):
    stale = file in (SAFETENSORS_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(file)
    if stale and file not in names:
      os.remove(os.path.join(out_dir, file))

  host = {}  # One host copy per stacked param, made when its first layer is written.
  weight_map = {}
  for file, shard in zip(names, shards):
    arrays = {}
    for t in shard:
      if t.path not in host:
        host[t.path] = _host(_get(params, t.path))
      value = host[t.path] if t.layer is None else host[t.path][t.layer]
      arrays[t.hf_name] = np.ascontiguousarray(t.to_hf(value).astype(np_dtype))
      weight_map[t.hf_name] = file
    save_file(arrays, os.path.join(out_dir, file), metadata={"format": "pt"})
  written = list(names)
  if len(names) > 1:
    total = sum(math.prod(t.hf_shape) for t in tensors) * np_dtype.itemsize
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                sort_keys=True)
    written.append(INDEX_FILE)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  written.append("config.json")
  if generation_config is not None:
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(generation_config, f, indent=2, sort_keys=True)
    written.append("generation_config.json")
  return written


def permute_interleaved_to_half(w_out_in, n_heads):
  """q_proj/k_proj weight from Meta's interleaved-pairs rope layout to HF's rotate_half layout.

  Meta's reference code rotates dimension pairs (0, 1), (2, 3), ... of each head; HF and jaxtrain
  rotate (j, j + H/2). Reordering each head's output rows as [0, 2, 4, ..., 1, 3, 5, ...] makes
  the two computations identical (HF's convert_llama_weights_to_hf.py does the same). `w_out_in`
  is (n_heads * head_dim, d_in), the HF Linear layout; pass n_kv_heads for k_proj.
  """
  out, d_in = w_out_in.shape
  head_dim = out // n_heads
  return w_out_in.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def permute_half_to_interleaved(w_out_in, n_heads):
  """Inverse of `permute_interleaved_to_half` (HF layout back to Meta's original)."""
  out, d_in = w_out_in.shape
  head_dim = out // n_heads
  return w_out_in.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


# ---------------------------------------------------------------------------------------------
# Workdirs: an HF directory as a params-only jaxtrain checkpoint, and back.


def _copy_files(names, src_dir, dst_dir):
  copied = [n for n in names if os.path.isfile(os.path.join(src_dir, n))]
  if copied:
    os.makedirs(dst_dir, exist_ok=True)
    for name in copied:
      shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  return copied


def _resolved_config(cfg, tokenizer_path):
  """The workdir's full config: today's defaults, the model section from the HF config.

  Training on from the workdir must tokenize as the model was trained to, so `data.tokenizer`
  points at the copied tokenizer; `data.seq_len` is capped at the model's context length.
  """
  from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
  full = config_lib.base_config()
  with full.unlocked():
    full.model.update(dataclasses.asdict(cfg))
    full.data.seq_len = min(full.data.seq_len, cfg.max_seq_len)
    if tokenizer_path:
      full.data.tokenizer = tokenizer_path
  return config_lib.to_json(full)


def _checkpointer(workdir, **kwargs):
  from jaxtrain import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  return checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), **kwargs)


def hf_to_workdir(hf_dir, workdir):
  """Import an HF LLaMA directory as a jaxtrain workdir with a params-only checkpoint at step 0.

  Params are fp32 (training keeps fp32 master weights). Returns a summary dict. Refuses a
  workdir that already holds checkpoints, so a run is never overwritten.
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f"{ckpt_dir} already holds checkpoints; convert into a new workdir")
  if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.isdir(ckpt_dir):
    # Not a workdir: an HF model (the source itself, say) would lose its config.json.
    raise UserError(f"{workdir} exists and is not empty; convert into a new workdir")
  hf_config = _read_json(os.path.join(hf_dir, "config.json"), "an HF LLaMA directory")
  cfg = config_from_hf(hf_config)
  _, abstract_params = model_lib.params_of(model_lib.abstract_model(cfg))
  params = jax.tree.map(jnp.asarray, _read_params(hf_dir, cfg, abstract_params))

  os.makedirs(workdir, exist_ok=True)
  tokenizer_dir = os.path.abspath(os.path.join(workdir, "tokenizer"))
  tokenizer = _copy_files(TOKENIZER_FILES, hf_dir, tokenizer_dir)
  main = [n for n in ("tokenizer.json", "tokenizer.model") if n in tokenizer]
  _copy_files(("config.json", "generation_config.json"), hf_dir,
              os.path.join(workdir, HF_SOURCE_DIR))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(_resolved_config(cfg, os.path.join(tokenizer_dir, main[0]) if main else None))
  meta = {"step": 0, "converted_from": os.path.abspath(hf_dir)}
  ckpt = _checkpointer(workdir, async_save=False)
  try:
    # Params and meta only: training from here starts a fresh optimizer and data position.
    ckpt.save(0, params, None, meta)
  finally:
    ckpt.close()
  return {"step": 0, "params": int(sum(x.size for x in jax.tree.leaves(params))),
          "tokenizer_files": tokenizer}


def workdir_to_hf(workdir, out_dir, step=None, dtype=None,
                  max_shard_bytes=DEFAULT_MAX_SHARD_BYTES):
  """Export a workdir's params (latest step, or `step`) as an HF LLaMA directory.

  Special token ids and generation_config.json come from `WORKDIR/hf_source/` when the workdir
  was itself imported from HF; tokenizer files from `WORKDIR/tokenizer/`. Returns a summary dict.
  """
  from jaxtrain import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  stored = _read_json(os.path.join(workdir, "config.json"), "a jaxtrain workdir")
  if not isinstance(stored.get("model"), dict):
    raise UserError(f"{workdir}/config.json has no model section")
  cfg = model_lib.ModelConfig.from_config(stored["model"])
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"{workdir}/checkpoints does not exist: no checkpoints in this workdir")
  abstract_params = model_lib.params_of(model_lib.abstract_model(cfg))[1]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = checkpoint_lib.abstract_with_shardings(
      abstract_params, jax.tree.map(lambda _: device, abstract_params))
  ckpt = _checkpointer(workdir, read_only=True)
  try:
    steps = sorted(ckpt.all_steps())
    if not steps:
      raise UserError(f"{workdir}/checkpoints holds no checkpoint")
    if step is None:
      step = ckpt.latest_valid_step()  # Invalid newer steps are named on stderr, passed over.
      if step is None:
        raise UserError(f"{workdir}/checkpoints holds no valid checkpoint")
    elif step not in steps:
      raise UserError(f"{workdir}/checkpoints has no step {step} (have {steps})")
    params = ckpt.restore_params(step, target)
  finally:
    ckpt.close()

  source_dir = os.path.join(workdir, HF_SOURCE_DIR)
  extra, generation_config = {}, None
  if os.path.isfile(os.path.join(source_dir, "config.json")):
    source = _read_json(os.path.join(source_dir, "config.json"), "the imported HF config")
    extra = {k: source[k] for k in TOKEN_ID_KEYS if k in source}
  if os.path.isfile(os.path.join(source_dir, "generation_config.json")):
    generation_config = _read_json(os.path.join(source_dir, "generation_config.json"),
                                   "the imported HF generation config")
  if os.path.isdir(out_dir):  # An earlier export's files that this one may not write again.
    for name in TOKENIZER_FILES + ("generation_config.json",):
      if os.path.isfile(os.path.join(out_dir, name)):
        os.remove(os.path.join(out_dir, name))
  files = save_hf(params, cfg, out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype,
                  extra_config=extra, generation_config=generation_config)
  tokenizer = _copy_files(TOKENIZER_FILES, os.path.join(workdir, "tokenizer"), out_dir)
  return {"step": step, "files": files + tokenizer, "tokenizer_files": tokenizer}


def _kind(path):
  """'hf', 'workdir' or None, by the same test `jaxtrain.load_model` uses."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  config = os.path.join(path, "config.json")
  if os.path.isfile(config):
    try:
      with open(config) as f:
        if "model_type" in json.load(f):
          return "hf"
    except (json.JSONDecodeError, UnicodeDecodeError):
      return None
  return None


def convert_command(src, dst, direction=None, step=None, dtype=None):
  """`jaxtrain convert SRC DST`: HF directory -> workdir or workdir -> HF directory.

  The direction comes from SRC (an HF directory has config.json with model_type, a workdir has
  checkpoints/) unless `direction` is "to_workdir" or "to_hf". Returns a one-line summary.
  """
  if not os.path.isdir(src):
    raise UserError(f"{src} is not a directory (expected an HF LLaMA directory or a workdir)")
  if direction is None:
    kind = _kind(src)
    if kind is None:
      raise UserError(f"{src} is neither an HF LLaMA directory (config.json with model_type) nor "
                      "a jaxtrain workdir (checkpoints/)")
    direction = "to_workdir" if kind == "hf" else "to_hf"
  if direction == "to_workdir":
    if step is not None or dtype is not None:
      raise UserError("--step and --dtype apply to exporting a workdir, not to importing an HF "
                      "directory (imports are float32)")
    info = hf_to_workdir(src, dst)
    tokenizer = ", ".join(info["tokenizer_files"]) or "none found"
    return f"{src} (HF) -> {dst}: {info['params']:,} params at step 0, tokenizer: {tokenizer}"
  if direction == "to_hf":
    if _kind(dst) == "workdir":
      raise UserError(f"{dst} is a jaxtrain workdir; export into a new directory")
    info = workdir_to_hf(src, dst, step=step, dtype=dtype)
    return f"{src} (step {info['step']}) -> {dst} (HF): {', '.join(info['files'])}"
  raise UserError(f"direction={direction!r} is not one of 'to_workdir', 'to_hf'")
