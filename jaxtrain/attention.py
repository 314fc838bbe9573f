"""Causal grouped-query attention behind one function, with several implementations.

`xla` is the reference: plain einsums with an fp32 softmax, runs on any device. `cudnn` calls
`jax.nn.dot_product_attention(implementation="cudnn")` (flash attention on NVIDIA GPUs); it only
supports bf16/fp16 and head dims that are multiples of 8 up to 128 (256 on Hopper), so unsupported
cases fall back to `xla` with a warning. `auto` picks `cudnn` where it is supported and `xla`
elsewhere. All implementations agree numerically (tests/test_model.py).
"""

import functools
import warnings

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def _cudnn_unsupported_reason(q_BTNH, head_dim):
  """Why cuDNN attention cannot run here, or None if it can."""
  if jax.default_backend() != "gpu":
    return f"backend is {jax.default_backend()!r}, not gpu"
  if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q_BTNH.dtype} (cuDNN needs bfloat16 or float16)"
  max_head_dim = 128
  kind = jax.devices()[0].device_kind.lower()
  if "h100" in kind or "h200" in kind or "gh200" in kind:
    max_head_dim = 256
  if head_dim % 8 or head_dim > max_head_dim:
    return f"head_dim {head_dim} (cuDNN needs a multiple of 8, at most {max_head_dim})"
  return None


@functools.lru_cache(maxsize=None)
def _warn_once(message):
  warnings.warn(message, stacklevel=3)


def resolve(impl, q_BTNH):
  """The implementation that will actually run for this query (trace-time decision)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
  if impl == "xla":
    return "xla"
  reason = _cudnn_unsupported_reason(q_BTNH, q_BTNH.shape[-1])
  if reason is None:
    return "cudnn"
  if impl == "cudnn":
    _warn_once(f"cudnn attention unsupported ({reason}); falling back to xla")
  return "xla"


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """Reference attention; grouped heads are handled by a reshape, never by repeating k/v."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKGTS * (H ** -0.5)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)


def causal_mask(q_positions_BT, kv_positions_BS, kv_valid_BS=None):
  """True where query t may attend to key s: key position <= query position (and key is valid)."""
  mask_BTS = kv_positions_BS[:, None, :] <= q_positions_BT[:, :, None]
  if kv_valid_BS is not None:
    mask_BTS = mask_BTS & kv_valid_BS[:, None, :]
  return mask_BTS


def attention(q_BTNH, k_BSKH, v_BSKH, *, impl="auto", q_positions_BT=None, kv_positions_BS=None,
              kv_valid_BS=None):
  """Causal attention of queries over keys/values; N must be a multiple of K (GQA).

  Without positions, queries and keys are the same sequence (training and prefill). With
  positions (decoding against a KV cache), key s is visible to query t when its position is at
  most t's and it is marked valid.
  """
  B, T, _, _ = q_BTNH.shape
  S = k_BSKH.shape[1]
  plain_causal = q_positions_BT is None and kv_positions_BS is None and kv_valid_BS is None
  if resolve(impl, q_BTNH) == "cudnn" and plain_causal and T == S:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True,
                                        implementation="cudnn")
  if q_positions_BT is None:
    q_positions_BT = jnp.broadcast_to(jnp.arange(S - T, S, dtype=jnp.int32), (B, T))
  if kv_positions_BS is None:
    kv_positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  mask_BTS = causal_mask(q_positions_BT, kv_positions_BS, kv_valid_BS)
  return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
