"""`jaxtrain info`: parameters, FLOPs per token and the memory plan, computed abstractly.

Everything comes from `nnx.eval_shape` / `jax.eval_shape`, so the answer for 1.4B parameters is
instant and allocates nothing.
"""

import jax
import numpy as np

from jaxtrain import config as config_lib, model as model_lib, optim

GIB = 2 ** 30


def _tree_bytes(tree):
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def summary(cfg):
  """A dict of the numbers `describe` prints (used by tests and notebooks)."""
  model_cfg = config_lib.validate(cfg)
  counts = model_lib.param_counts(model_cfg)
  _, abstract_params = model_lib.params_of(model_lib.abstract_model(model_cfg))
  actual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
  assert actual == counts["total"], (actual, counts)
  tx = optim.build_optimizer(cfg.optimizer, cfg.train.steps)
  opt_state = jax.eval_shape(tx.init, abstract_params)
  return {
      "params_total": counts["total"],
      "params_embedding": counts["embedding"],
      "params_non_embedding": counts["non_embedding"],
      "flops_per_token": model_lib.flops_per_token(model_cfg, cfg.data.seq_len),
      "param_bytes": _tree_bytes(abstract_params),
      "opt_state_bytes": _tree_bytes(opt_state),
      # With train.batch_size_per_device the global batch grows with the devices: per device.
      "tokens_per_step": (cfg.train.batch_size_per_device or cfg.train.batch_size)
                         * cfg.data.seq_len,
      "tokens_per_step_per_device": bool(cfg.train.batch_size_per_device),
  }


def describe(cfg, routing=False):
  s = summary(cfg)
  m = cfg.model
  lines = [
      f"model: d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} "
      f"n_kv_heads={m.n_kv_heads or m.n_heads} d_ff={m.d_ff} vocab={m.vocab_size} "
      f"tied={m.tie_embeddings} dtype={m.dtype} params={m.param_dtype}",
      f"parameters: {s['params_total']:,} total ({s['params_total'] / 1e9:.3f}B), "
      f"{s['params_embedding']:,} embedding, {s['params_non_embedding']:,} non-embedding",
      f"FLOPs/token (training, seq_len={cfg.data.seq_len}): {s['flops_per_token'] / 1e9:.3f} GFLOP "
      "= 6*N_matmul + 6*N_head + 6*L*d*T (causal attention counted as half)",
      f"FLOPs/step: {s['flops_per_token'] * s['tokens_per_step'] / 1e12:.2f} TFLOP "
      + (f"per device ({s['tokens_per_step']:,} tokens: train.batch_size_per_device="
         f"{cfg.train.batch_size_per_device})" if s["tokens_per_step_per_device"] else
         f"({s['tokens_per_step']:,} tokens)"),
      f"memory: params {s['param_bytes'] / GIB:.2f} GiB, optimizer state "
      f"({cfg.optimizer.name}) {s['opt_state_bytes'] / GIB:.2f} GiB, gradients "
      f"{s['param_bytes'] / GIB:.2f} GiB; total "
      f"{(2 * s['param_bytes'] + s['opt_state_bytes']) / GIB:.2f} GiB before activations "
      "(divided by the fsdp size when sharded)",
  ]
  if routing:
    model_cfg = config_lib.validate(cfg)
    _, abstract_params = model_lib.params_of(model_lib.abstract_model(model_cfg))
    lines.append("")
    lines.append(optim.format_routing_table(optim.routing_table(abstract_params, cfg.optimizer)))
  return "\n".join(lines)
