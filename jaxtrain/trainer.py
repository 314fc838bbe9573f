"""The train state, the jit-compiled step, and the loop.

The hot step is a pure function over `(state, batch)`: params are a plain nested dict of arrays,
merged into the NNX model inside the trace (`nnx.merge(graphdef, params)`), so there is no
per-call NNX graph traversal (Flax's performance guide; flax#4459). The state is created directly
sharded by a jit with `out_shardings` over the abstract state and is donated to every step.
Metrics of step t are fetched after step t+1 is dispatched, so the device never waits on the host.
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtrain import checkpoint as checkpoint_lib
from jaxtrain import config as config_lib
from jaxtrain import distributed
from jaxtrain import hardware, metrics as metrics_lib, model as model_lib, ops, optim, sharding
from jaxtrain import nonfinite as nonfinite_lib
from jaxtrain.data import tokenizer as tokenizer_lib
from jaxtrain.errors import RunFailure, UserError


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ---------------------------------------------------------------------------------------------
# Loss


def _auto_chunk(B, T, V, budget_bytes=64 * 2 ** 20):
  """Sequence positions per loss chunk so that one chunk's fp32 logits stay under the budget.

  B and V are what one device holds (rows of its batch shard, its slice of the vocabulary)."""
  if B * T * V * 4 <= budget_bytes:
    return T
  chunk = max(1, budget_bytes // (B * V * 4))
  while T % chunk:
    chunk -= 1
  return chunk


def _chunked(fn, chunk, *arrays_BT):
  """Run `fn` on chunks of `chunk` sequence positions of [B, T, ...] arrays under `lax.scan`.

  `fn(*chunks) -> (carry_update, per_chunk_out)`; returns (sum of carry updates, per_chunk outputs
  joined back to [B, T, ...]). One chunk (chunk >= T, or T not a multiple) runs without a scan.
  """
  B, T = arrays_BT[0].shape[:2]
  if chunk >= T or T % chunk:
    return fn(*arrays_BT)
  n = T // chunk
  split = lambda a: jnp.moveaxis(a.reshape(B, n, chunk, *a.shape[2:]), 1, 0)
  join = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, T, *a.shape[3:])

  def body(total, xs):
    update, out = fn(*xs)
    return jax.tree.map(jnp.add, total, update), out

  first_update = jax.eval_shape(lambda *a: fn(*a)[0], *[a[:, :chunk] for a in arrays_BT])
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), first_update)
  total, outs = jax.lax.scan(body, zeros, tuple(split(a) for a in arrays_BT))
  return total, jax.tree.map(join, outs)


def _chunk_logits(h_BCD, w_DV, t_BC):
  """fp32 logits of one chunk, their log-sum-exp and the logits of the targets."""
  h_BCD = sharding.constrain(h_BCD, ("batch", "seq", "embed"))
  logits_BCV = ops.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32)
  logits_BCV = sharding.constrain(logits_BCV, ("batch", "seq", "vocab"))
  lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
  target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
  return logits_BCV, lse_BC, target_BC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear_cross_entropy(h_BTD, w_DV, targets_BT, mask_BT, chunk):
  def one(h_BCD, t_BC, m_BC):
    _, lse_BC, target_BC = _chunk_logits(h_BCD, w_DV, t_BC)
    return jnp.sum((lse_BC - target_BC) * m_BC), None

  return _chunked(one, chunk, h_BTD, targets_BT, mask_BT)[0]


def _linear_cross_entropy_fwd(h_BTD, w_DV, targets_BT, mask_BT, chunk):
  """Loss and its gradients in one pass: d loss / d logits = softmax - one_hot(target) is known
  as soon as a chunk's logits are, so each chunk's logits are used once and dropped. Compared
  with recomputing them in the backward pass (jax.checkpoint) this saves one of the four
  vocabulary-sized matmuls of the head (a quarter of its FLOPs) and all of their re-reads."""
  V = w_DV.shape[1]

  def one(h_BCD, t_BC, m_BC):
    logits_BCV, lse_BC, target_BC = _chunk_logits(h_BCD, w_DV, t_BC)
    loss_BC = lse_BC - target_BC
    onehot_BCV = t_BC[..., None] == jnp.arange(V, dtype=t_BC.dtype)
    dlogits_BCV = ((jnp.exp(logits_BCV - lse_BC[..., None]) - onehot_BCV)
                   * m_BC[..., None]).astype(h_BCD.dtype)
    dh_BCD = ops.einsum("bcv,dv->bcd", dlogits_BCV, w_DV,
                        preferred_element_type=jnp.float32).astype(h_BCD.dtype)
    dw_DV = ops.einsum("bcd,bcv->dv", h_BCD, dlogits_BCV, preferred_element_type=jnp.float32)
    return (jnp.sum(loss_BC * m_BC), dw_DV), (loss_BC, dh_BCD)

  (loss, dw_DV), (loss_BT, dh_BTD) = _chunked(one, chunk, h_BTD, targets_BT, mask_BT)
  return loss, (dh_BTD, dw_DV.astype(w_DV.dtype), loss_BT)


def _linear_cross_entropy_bwd(chunk, residuals, g):
  del chunk
  dh_BTD, dw_DV, loss_BT = residuals
  return ((g * dh_BTD).astype(dh_BTD.dtype), (g * dw_DV).astype(dw_DV.dtype), None,
          g * loss_BT)


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def cross_entropy_sum(h_BTD, w_DV, targets_BT, mask_BT=None, chunk=0):
  """Sum over positions of -log p(target), never holding more than one chunk of logits.

  The head matmul and the loss are one custom-VJP function (`_linear_cross_entropy_fwd`): under
  differentiation each chunk's gradients are computed right after its logits, so the [B, T, V]
  fp32 logits are never materialised for long sequences or large vocabularies, and never
  recomputed either. The automatic chunk is sized for what one device holds.
  """
  B, T, D = h_BTD.shape
  V = w_DV.shape[1]
  w_DV = w_DV.astype(h_BTD.dtype)
  mask_BT = (jnp.ones((B, T), jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32))
  if not chunk:
    mesh = jax.sharding.get_abstract_mesh()
    vocab_split = 1 if mesh.empty else mesh.shape.get(sharding.RULES["vocab"], 1)
    chunk = _auto_chunk(max(1, B // sharding.batch_axes_size()), T, max(1, V // vocab_split))
  return _linear_cross_entropy(h_BTD, w_DV, targets_BT, mask_BT, chunk)


def loss_sum_and_count(params, graphdef, batch, loss_chunk=0, with_max_logits=False):
  """(loss sum, token count), and the [L, N] max attention logits when asked (QK-clip)."""
  model = nnx.merge(graphdef, params)
  h_BTD = model.hidden_states(batch["inputs"], with_max_logits=with_max_logits)
  h_BTD, max_logits_LN = h_BTD if with_max_logits else (h_BTD, None)
  mask_BT = batch.get("mask")
  loss_sum = cross_entropy_sum(h_BTD, model.head_kernel(), batch["targets"], mask_BT, loss_chunk)
  count = (jnp.sum(mask_BT.astype(jnp.float32)) if mask_BT is not None
           else jnp.float32(batch["targets"].size))
  return (loss_sum, count, max_logits_LN) if with_max_logits else (loss_sum, count)


# ---------------------------------------------------------------------------------------------
# Setup: everything derived from the config before anything is compiled.


def _opt_state_shardings(abstract_opt_state, param_shardings_by_path, shapes_by_path, mesh):
  """Optimizer-state leaves that mirror a parameter (same path and shape) take its sharding."""
  replicated = sharding.replicated(mesh)

  def one(path, leaf):
    keys = tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))
    for start in range(len(keys)):
      sub = keys[start:]
      if sub in param_shardings_by_path and tuple(leaf.shape) == shapes_by_path[sub]:
        return param_shardings_by_path[sub]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _flatten_by_path(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(p.key for p in path): leaf for path, leaf in flat}


@dataclasses.dataclass
class Setup:
  """The compiled pieces of a run, built from a validated config."""
  config: Any
  model_config: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: Any
  abstract_state: TrainState  # ShapeDtypeStructs carrying target shardings.
  state_shardings: TrainState
  batch_sharding: Any
  tx: optax.GradientTransformation
  schedule: Any
  flops_per_token: int

  def init(self, seed):
    """The initial state, created directly with its target shardings."""
    c, tx = self.model_config, self.tx

    def init_fn():
      _, params = model_lib.params_of(model_lib.create(c, seed))
      return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    with jax.set_mesh(self.mesh):
      return jax.jit(init_fn, out_shardings=self.state_shardings)()


def make_setup(config, mesh=None, *, unroll_loops=False) -> Setup:
  """Everything derived from the config for a run on `mesh` (default: all devices).

  `unroll_loops` unrolls the Newton-Schulz loop, so XLA's cost analysis (which counts a loop
  body once) sees every step; the planner's FLOP counts use it.
  """
  config = config_lib.resolve(config, jax.device_count() if mesh is None else mesh.size)
  model_cfg = config_lib.validate(config, jax.device_count() if mesh is None else mesh.size)
  mesh = mesh if mesh is not None else distributed.make_mesh(config.mesh)
  abstract = model_lib.abstract_model(model_cfg)
  graphdef, abstract_params = model_lib.params_of(abstract)
  axes = model_lib.logical_axes(abstract)
  param_shardings = sharding.param_shardings(axes, abstract_params, mesh)
  total_steps = config.train.steps
  tx = optim.build_optimizer(config.optimizer, total_steps, mesh=mesh,
                             param_shardings=param_shardings, unroll_ns=unroll_loops)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = _opt_state_shardings(
      abstract_opt_state, _flatten_by_path(param_shardings),
      {k: tuple(v.shape) for k, v in _flatten_by_path(abstract_params).items()}, mesh)
  state_shardings = TrainState(sharding.replicated(mesh), param_shardings, opt_shardings)
  abstract_state = TrainState(
      jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
      checkpoint_lib.abstract_with_shardings(abstract_params, param_shardings),
      checkpoint_lib.abstract_with_shardings(abstract_opt_state, opt_shardings))
  return Setup(config, model_cfg, mesh, graphdef, abstract_state, state_shardings,
               sharding.batch_sharding(mesh), tx, optim.lr_schedule(config.optimizer, total_steps),
               model_lib.flops_per_token(model_cfg, config.data.seq_len))


# ---------------------------------------------------------------------------------------------
# The step.


def make_train_step(s: Setup):
  """jit(train_step)(state, batch) -> (state, metrics); the state is donated."""
  graphdef, tx, schedule = s.graphdef, s.tx, s.schedule
  M = s.config.train.microbatches
  loss_chunk = s.config.train.loss_chunk
  opt_cfg = s.config.optimizer
  tau = opt_cfg.qk_clip_tau  # > 0: QK-clip (optim/qk_clip.py) needs the max logits as aux
  skip_nonfinite = s.config.train.on_nonfinite == "skip"

  def mean_loss(params, batch):
    out = loss_sum_and_count(params, graphdef, batch, loss_chunk, with_max_logits=tau > 0)
    return out[0] / out[1], (out[2] if tau > 0 else None)

  grad_fn = jax.value_and_grad(mean_loss, has_aux=True)  # ((loss, max logits|None), grads)
  param_shardings = s.state_shardings.params
  L, N = s.model_config.n_layers, s.model_config.n_heads

  def grads_of(params, batch):
    if M == 1:
      return grad_fn(params, batch)
    # Microbatch m takes rows m, m+M, m+2M...: every device keeps its own rows (no resharding).
    def split(a):
      a = jnp.swapaxes(a.reshape(a.shape[0] // M, M, *a.shape[1:]), 0, 1)
      return sharding.constrain(a, (None, "batch") + (None,) * (a.ndim - 2))
    micro = jax.tree.map(split, batch)
    # The accumulator lives where the params do (sharded under FSDP), never replicated.
    accumulate = lambda acc: jax.lax.with_sharding_constraint(acc, param_shardings)
    zeros = accumulate(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def body(carry, mb):
      (loss_acc, max_acc), grad_acc = carry
      (loss, max_logits), grads = grad_fn(params, mb)
      max_acc = None if max_acc is None else jnp.maximum(max_acc, max_logits)
      return ((loss_acc + loss, max_acc), accumulate(jax.tree.map(jnp.add, grad_acc, grads))), None

    max0 = jnp.full((L, N), -jnp.inf, jnp.float32) if tau > 0 else None
    ((loss, max_logits), grads), _ = jax.lax.scan(
        body, ((jnp.zeros((), jnp.float32), max0), zeros), micro)
    return (loss / M, max_logits), jax.tree.map(lambda g: g / M, grads)

  def train_step(state, batch):
    # The mesh in context is what the model's activation constraints read (sharding.constrain).
    with jax.sharding.use_abstract_mesh(s.mesh.abstract_mesh):
      (loss, max_logits_LN), grads = grads_of(state.params, batch)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if tau > 0:  # QK-clip: rescale the heads whose logits passed tau in this batch.
      params = optim.clip_qk(params, max_logits_LN, tau)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    if skip_nonfinite:  # train.on_nonfinite=skip: a non-finite step leaves the state as it was.
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    metrics.update(optim.group_update_rms(updates, opt_cfg))
    if tau > 0:
      metrics["max_logit"] = jnp.max(max_logits_LN)
    return TrainState(state.step + 1, params, opt_state), metrics

  replicated = sharding.replicated(s.mesh)
  return jax.jit(train_step, in_shardings=(s.state_shardings, s.batch_sharding),
                 out_shardings=(s.state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(s: Setup):
  """jit(eval_step)(params, batch) -> (loss sum, token count, byte count)."""
  graphdef = s.graphdef
  loss_chunk = s.config.train.loss_chunk

  def eval_step(params, batch):
    with jax.sharding.use_abstract_mesh(s.mesh.abstract_mesh):
      loss_sum, count = loss_sum_and_count(params, graphdef, batch, loss_chunk)
    return loss_sum, count, jnp.sum(batch["num_bytes"].astype(jnp.float32))

  return jax.jit(eval_step, in_shardings=(s.state_shardings.params, s.batch_sharding))


def to_global(batch, batch_sharding):
  """Per-process numpy batch -> global jax arrays sharded over the data axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items()}


def evaluate_params(s: Setup, eval_step, params, batches):
  """Mean loss and bits per byte over an iterable of batches."""
  loss_sum, count, nbytes = 0.0, 0.0, 0.0
  for batch in batches:
    l, c, b = jax.device_get(eval_step(params, to_global(batch, s.batch_sharding)))
    loss_sum, count, nbytes = loss_sum + float(l), count + float(c), nbytes + float(b)
  if count == 0:
    raise UserError("evaluation produced no batches (the split holds less than one batch of "
                    "data.seq_len tokens); use more data or a smaller data.seq_len")
  return {"eval_loss": loss_sum / count,
          "bits_per_byte": loss_sum / (math.log(2) * nbytes) if nbytes else float("nan"),
          "eval_tokens": count}


# ---------------------------------------------------------------------------------------------
# The loop.


# What a resumed run must keep: the model's shapes and numerics, the data stream (which
# documents, cut how, in which order, read by how many Grain workers), the seed and the
# optimizer (its state's structure). The tokenizer is compared itself, whatever data.tokenizer
# names (`train`). Anything else (learning rate, steps, batch size, mesh, evaluation,
# checkpointing) may change, and is named in a warning.
RESUME_KEEPS = (
    "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.head_dim",
    "model.d_ff", "model.vocab_size", "model.tie_embeddings", "model.norm_eps",
    "model.param_dtype", "model.rope_theta", "model.rope_scaling_factor",
    "model.rope_low_freq_factor", "model.rope_high_freq_factor",
    "model.rope_original_max_seq_len", "data.source", "data.text_field", "data.max_docs",
    "data.seq_len", "data.shuffle_seed", "data.validation_fraction", "data.weights",
    "data.shard_mb", "data.worker_count", "train.seed", "optimizer.name")
_RESUME_SILENT = ("distributed.", "train.progress_bar")  # Differ per launch or process.


def check_resume_config(saved, cfg, where):
  """Compare the config a checkpoint was written with (`saved`, a dict) with this run's `cfg`.

  Raises UserError (one line) if a `RESUME_KEEPS` key changed: resuming would silently train on
  other data or another model, or fail deep in the restore. Returns the
  other changes, "key old -> new", for a warning. Keys one side lacks (configs written by
  another version) are not compared."""
  old = dict(config_lib.flat_items(saved))
  new = dict(config_lib.flat_items(json.loads(config_lib.to_json(cfg))))  # Tuples as lists.
  changed = [k for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]
  kept = [k for k in changed
          if any(k == keep or k.startswith(keep + ".") for keep in RESUME_KEEPS)]
  if kept:
    what = ", ".join(f"{k}={old[k]!r} (now {new[k]!r})" for k in kept[:3])
    more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
    raise UserError(f"{where} was trained with {what}{more}: a resumed run keeps its model, data, "
                    "seed and optimizer; set the old value, or train into a new --workdir")
  return [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed if not k.startswith(_RESUME_SILENT)]


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved. Re-running the same command resumes."""


class _SigtermFlag:
  """`stop(step)`: whether to save and exit after `step` because of a SIGTERM.

  Alone, a Python handler sets a flag. With several processes a SIGTERM usually reaches one of
  them, and one that stops alone leaves the others waiting in the next collective forever: then
  JAX's preemption service (which owns SIGTERM; no Python handler is installed) tells every
  process, and `reached_preemption_sync_point` is true at the same step on all of them.
  """

  def __init__(self, coordinated=False):
    self.raised = False
    self._previous = None
    self._coordinated = coordinated

  def stop(self, step):
    if self._coordinated:
      self.raised = self.raised or distributed.preemption_sync_point(step)
    return self.raised

  def __enter__(self):
    if self._coordinated:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. a notebook worker): no preemption handling.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _progress(total, initial, enabled):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def train(config, workdir, *, mesh=None, stop_after=None, log=print):
  """Train (or resume) the run in `workdir`; returns the last metrics record.

  `stop_after` stops (with a checkpoint) after that many steps of this call, as a preemption
  would; tests use it to check that resuming reproduces an uninterrupted run exactly.
  """
  from jaxtrain import data  # pylint: disable=import-outside-toplevel
  distributed.initialize(config.distributed)  # Before anything asks JAX for its devices.
  s = make_setup(config, mesh)
  cfg = s.config
  is_main = jax.process_index() == 0
  checkpoint_lib.check_writable(workdir)  # One line naming the directory, before any compile.
  saved_step, saved_config = checkpoint_lib.newest_config(os.path.join(workdir, "checkpoints"))
  if saved_config is not None:
    changes = check_resume_config(saved_config, cfg, f"{workdir} (checkpoint {saved_step})")
    if changes and is_main:
      checkpoint_lib.warn_stderr(f"resuming with changed settings: {'; '.join(changes)}")

  vocab = s.model_config.vocab_size

  def prepare():  # Process 0 first; the others wait at a barrier, then read (distributed.once).
    t0, cached = time.time(), data.is_prepared(cfg.data, vocab)
    tok = data.load_tokenizer(cfg.data, vocab, process_index=jax.process_index(),
                              process_count=jax.process_count())
    if not cached:
      log(f"process {jax.process_index()}: prepared data in {time.time() - t0:.1f}s")
    return tok

  tokenizer = distributed.once(prepare)
  run_tokenizer = os.path.join(workdir, "tokenizer")
  if tokenizer_lib.saved_file(run_tokenizer) is not None and checkpoint_lib.newest_step(
      os.path.join(workdir, "checkpoints")) is not None:
    # The checkpoints were trained on the run's token ids: data that tokenizes otherwise (the
    # corpus changed under data.source and BPE was retrained, or data.tokenizer names another
    # one) would train them on ids that mean other text.
    if not tokenizer_lib.same_as_saved(tokenizer, run_tokenizer):
      raise UserError(f"{run_tokenizer} differs from the tokenizer data.source gives now, and the "
                      "checkpoints use its ids: the corpus changed since the run started (files "
                      "added, removed or edited) or data.tokenizer names another; set "
                      f"--config.data.tokenizer={tokenizer_lib.saved_file(run_tokenizer)} to "
                      "tokenize with the run's, or train into a new --workdir")
  elif is_main:  # Whole or not at all: another process may be checking it (above) right now.
    tmp = f"{run_tokenizer}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    shutil.rmtree(run_tokenizer, ignore_errors=True)
    os.replace(tmp, run_tokenizer)
  dp_size = sharding.data_parallel_size(s.mesh)
  per_process_batch = cfg.train.batch_size // jax.process_count()
  train_iter = data.train_iterator(cfg.data, vocab, per_process_batch, seed=cfg.train.seed)
  eval_batch = cfg.train.batch_size // cfg.train.microbatches
  del dp_size
  distributed.check_batch_rows(s.batch_sharding, cfg.train.batch_size)

  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                     async_save=cfg.checkpoint.async_save)
  # The newest checkpoint that passes its checks and restores; invalid ones are named and set aside.
  latest, restored = ckpt.restore_latest(s.abstract_state.params, s.abstract_state.opt_state,
                                         train_iter)
  if is_main:  # The resolved config (train.batch_size as this run uses it), once it resumed.
    metrics_lib.write_atomically(os.path.join(workdir, "config.json"), config_lib.to_json(cfg))
  if latest is not None:
    opt_state = restored.get("opt_state")
    if opt_state is None:  # Params only (e.g. `jaxtrain convert` from HF): fresh optimizer.
      opt_state = jax.jit(s.tx.init, out_shardings=s.state_shardings.opt_state)(restored["params"])
    state = TrainState(jax.device_put(jnp.int32(restored["meta"]["step"]),
                                      s.state_shardings.step),
                       restored["params"], opt_state)
    if is_main:
      log(f"resumed from {ckpt.directory}/{latest}")
  else:
    state = s.init(cfg.train.seed)
  start = int(jax.device_get(state.step))

  train_step = make_train_step(s)
  eval_step = make_eval_step(s)
  peak, peak_source = hardware.device_peak_tflops(cfg.model.dtype)
  throughput = metrics_lib.Throughput(s.flops_per_token, jax.device_count(), peak)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  if is_main:
    metrics_lib.write_run_info(workdir, {
        "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
        "num_devices": jax.device_count(), "num_processes": jax.process_count(),
        "peak_tflops_per_device": peak, "peak_source": peak_source,
        "flops_per_token": s.flops_per_token, "tokens_per_step": cfg.train.batch_size *
        cfg.data.seq_len, "params": model_lib.param_counts(s.model_config)["total"],
        "jax_version": jax.__version__})
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  steps = cfg.train.steps
  last_step = steps if stop_after is None else min(steps, start + stop_after)
  if is_main:
    log(f"{s.model_config.n_layers} layers, {model_lib.param_counts(s.model_config)['total']:,} "
        f"params, {s.flops_per_token / 1e6:.1f} MFLOP/token, mesh {dict(s.mesh.shape)}, "
        f"peak {'none' if peak is None else f'{peak:.4g} TFLOP/s'} ({peak_source}); "
        f"steps {start} -> {last_step}")
    if start >= last_step:
      log(f"nothing to train: {workdir} is at step {start} and train.steps is {steps}")

  guard = nonfinite_lib.Guard(cfg.train.on_nonfinite, cfg.train.max_nonfinite_in_a_row,
                             ckpt.directory)
  guard.last_saved = latest

  def save(step):
    guard.check(upto=step)  # Never a checkpoint of a non-finite step.
    meta = {"step": step, "config": cfg.to_dict()}
    ckpt.save(step, state.params, state.opt_state, meta, train_iter)
    guard.last_saved = step

  def run_eval(step):
    """One eval line over the validation split; a mixture adds one line per source."""
    batch = eval_batch // jax.process_count()
    limit = cfg.train.eval_batches
    batches = data.eval_iterator(cfg.data, vocab, batch, split="validation", max_batches=limit)
    record = {"step": step, "split": "validation",
              **evaluate_params(s, eval_step, state.params, batches)}
    writer.write(record)
    per_source = data.eval_iterators(cfg.data, vocab, batch, split="validation",
                                     max_batches=limit)
    if len(per_source) > 1:
      for name, source_batches in per_source.items():
        writer.write({"step": step, "split": "validation", "source": name,
                      **evaluate_params(s, eval_step, state.params, source_batches)})
    return record

  t_start = time.time()
  pending = None  # (step, metrics still on the device)
  clock = None  # (step, time) when the device was last known to have finished `step`
  last_record = {"step": start}
  bar = _progress(last_step, start, cfg.train.progress_bar)

  def flush(pending_item):
    """Write step t's metrics; fetching them waits for step t only, not for t+1 in flight."""
    nonlocal clock
    step, device_metrics = pending_item
    guard.check(upto=step)
    record = {"step": step, **{k: float(v) for k, v in jax.device_get(device_metrics).items()}}
    if cfg.train.on_nonfinite == "skip":
      record["nonfinite_skipped"] = guard.skipped  # Steps skipped so far by this process.
    now = time.time()
    n_steps, seconds = step - clock[0], now - clock[1]
    clock = (step, now)
    record.update(throughput(n_steps * tokens_per_step, seconds) if n_steps > 0 else
                  {"tokens_per_sec": float("nan"), "tflops_per_device": float("nan"),
                   "mfu": float("nan")})
    record["elapsed_sec"] = now - t_start
    writer.write(record)
    if bar is not None:
      bar.set_postfix(loss=f"{record['loss']:.3f}", mfu=f"{record['mfu']:.2f}")
    return record

  try:
    with _SigtermFlag(distributed.coordinated()) as sigterm, jax.set_mesh(s.mesh):
      step = start
      while step < last_step:
        batch = to_global(next(train_iter), s.batch_sharding)
        state, device_metrics = train_step(state, batch)
        step += 1
        guard.push(step, device_metrics)
        guard.check(upto=step - 1)  # One step late: the device is busy with this one.
        if clock is None:  # The first step includes compilation: time from its end.
          jax.block_until_ready(device_metrics)
          clock = (step, time.time())
        if pending is not None:
          last_record = flush(pending)
          pending = None
        if step % cfg.train.log_every == 0 or step == last_step:
          pending = (step, device_metrics)
        if bar is not None:
          bar.update(1)
        is_last = step == steps
        do_eval = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or is_last
        do_save = step % cfg.checkpoint.every == 0 or step == last_step
        if do_eval or do_save:
          if pending is not None:
            last_record = flush(pending)
            pending = None
          guard.check(upto=step)
          if do_eval:
            last_record = {**last_record, **run_eval(step)}
          if do_save:
            save(step)
          clock = (step, time.time())  # Evaluation and saving are not training throughput.
        if sigterm.stop(step):
          if pending is not None:
            last_record = flush(pending)
            pending = None
          if step % cfg.checkpoint.every and step != last_step:
            save(step)
          ckpt.wait()
          raise Preempted(f"preempted (SIGTERM) at step {step}: checkpoint saved in "
                          f"{ckpt.directory}; re-run the same command to resume")
      if pending is not None:
        last_record = flush(pending)
      guard.check(upto=step)
      ckpt.wait()  # The last save ends under the SIGTERM handler: a SIGTERM cannot cut it short.
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1 and not isinstance(e, (Preempted, UserError, RunFailure)):
      distributed.exit_on_error(e)  # A peer probably died: never wait for it (exits 1).
    raise
  finally:
    if bar is not None:
      bar.close()
    if hasattr(train_iter, "close"):  # Grain worker processes, when data.worker_count > 0.
      train_iter.close()
    ckpt.close()
    distributed.stop_watchdog()  # The loop is over: processes may now finish at their own pace.
    try:
      writer.close()
    except OSError:  # Disk full: the error already on its way (a RunFailure) is the one to show.
      if sys.exc_info()[0] is None:
        raise
  if is_main and step == steps:
    metrics_lib.plot_loss_curve(workdir)
  return last_record
