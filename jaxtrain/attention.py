"""Causal grouped-query attention behind one function, with several implementations.

`xla` is the reference: plain einsums with an fp32 softmax, runs on any device. `cudnn` calls
`jax.nn.dot_product_attention(implementation="cudnn")` (flash attention on NVIDIA GPUs); where
cuDNN cannot run (`cudnn_unsupported_reason`: compute capability, dtype, head dim, sequence
lengths) it falls back to `xla` with a warning naming the reason. `cpu` is block-causal
attention written for XLA:CPU (see `blocked_causal_attention`); it is plain JAX and runs
anywhere, but only CPUs gain from it. `auto` picks `cudnn` where it is supported, `cpu` on the CPU backend and `xla` elsewhere. All
implementations agree numerically (tests/test_model.py, tests/test_perf_paths.py).
"""

import functools
import warnings

import jax
import jax.numpy as jnp

from jaxtrain import ops

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "cpu")

# Query rows per block of the `cpu` implementation (see `blocked_causal_attention`). For the 35M
# step on CPU 256 measured faster than 128, and alone faster than 512 (docs/benchmarks.md).
CPU_BLOCK = 256


def cudnn_unsupported_reason(dtype, head_dim, q_len, kv_len, device=None):
  """Why cuDNN flash attention cannot run this causal attention on `device`, or None if it can.

  The rules of `jax.nn.dot_product_attention(implementation="cudnn")` (its
  `check_is_flash_attention`) and of cuDNN's fused flash kernels: an NVIDIA GPU of compute
  capability 8.0 or newer (A100, A40, L40S, H100, H200), bf16 or fp16, a head dim that is a
  multiple of 8 and at most 128 (256 from Hopper, 9.0, on), and queries and keys of one sequence
  (training, prefill). Decoding against a cache takes the masked `xla` path.
  """
  device = device or jax.devices()[0]
  if device.platform != "gpu":
    return f"platform is {device.platform!r}, not gpu"
  capability = getattr(device, "compute_capability", None)
  if capability is None:
    return f"{device.device_kind!r} reports no CUDA compute capability"
  major_minor = tuple(int(x) for x in str(capability).split(".")[:2])
  if major_minor < (8, 0):
    return f"compute capability {capability} (cuDNN flash attention needs 8.0 or newer)"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype).name} (cuDNN needs bfloat16 or float16)"
  max_head_dim = 256 if major_minor >= (9, 0) else 128
  if head_dim % 8 or head_dim > max_head_dim:
    return (f"head_dim {head_dim} (cuDNN needs a multiple of 8, at most {max_head_dim} on "
            f"compute capability {capability})")
  if q_len != kv_len:
    return f"query length {q_len} != key length {kv_len} (decoding uses the masked path)"
  return None


@functools.lru_cache(maxsize=None)
def _warn_once(message):
  warnings.warn(message, stacklevel=3)


def resolve(impl, q_BTNH, kv_len=None):
  """The implementation that will actually run for this query (trace-time decision)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
  if impl in ("xla", "cpu"):
    return impl
  T, H = q_BTNH.shape[1], q_BTNH.shape[-1]
  reason = cudnn_unsupported_reason(q_BTNH.dtype, H, T, T if kv_len is None else kv_len)
  if reason is None:
    return "cudnn"
  if impl == "cudnn":
    _warn_once(f"cudnn attention unsupported ({reason}); falling back to xla")
    return "xla"
  return "cpu" if jax.default_backend() == "cpu" else "xla"


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """Reference attention; grouped heads are handled by a reshape, never by repeating k/v."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
  scores_BKGTS = ops.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKGTS * (H ** -0.5)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)


def _query_blocks(T, block):
  """(start, stop) of each block of query rows; the rows of a block see keys [0, stop)."""
  return tuple((start, min(start + block, T)) for start in range(0, T, block))


def _block_scores(q_BKCGH, k_BKSH, start):
  """fp32 scores of query rows [start, start + C) against keys [0, start + C), future masked."""
  C = q_BKCGH.shape[2]
  stop = start + C
  s_BKCGS = ops.einsum("bkcgh,bksh->bkcgs", q_BKCGH, k_BKSH[:, :, :stop],
                   preferred_element_type=jnp.float32)
  row_C11 = start + jnp.arange(C, dtype=jnp.int32)[:, None, None]
  col_S = jnp.arange(stop, dtype=jnp.int32)
  return jnp.where(col_S <= row_C11, s_BKCGS, jnp.finfo(jnp.float32).min)


def _blocked_forward(q_BKTGH, k_BKSH, v_BKSH, block):
  out, lse = [], []
  for start, stop in _query_blocks(q_BKTGH.shape[2], block):
    s_BKCGS = _block_scores(q_BKTGH[:, :, start:stop], k_BKSH, start)
    max_BKCG = jnp.max(s_BKCGS, axis=-1)
    p_BKCGS = jnp.exp(s_BKCGS - max_BKCG[..., None])
    sum_BKCG = jnp.sum(p_BKCGS, axis=-1)
    o_BKCGH = ops.einsum("bkcgs,bksh->bkcgh", p_BKCGS.astype(v_BKSH.dtype), v_BKSH[:, :, :stop],
                     preferred_element_type=jnp.float32)
    out.append((o_BKCGH / sum_BKCG[..., None]).astype(v_BKSH.dtype))
    lse.append(max_BKCG + jnp.log(sum_BKCG))
  return jnp.concatenate(out, axis=2), jnp.concatenate(lse, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_causal(q_BKTGH, k_BKSH, v_BKSH, block):
  return _blocked_forward(q_BKTGH, k_BKSH, v_BKSH, block)[0]


def _blocked_causal_fwd(q_BKTGH, k_BKSH, v_BKSH, block):
  o_BKTGH, lse_BKTG = _blocked_forward(q_BKTGH, k_BKSH, v_BKSH, block)
  return o_BKTGH, (q_BKTGH, k_BKSH, v_BKSH, o_BKTGH, lse_BKTG)


def _contract_rows(x_BKCGH, p_BKCGE):
  """sum over query rows of x[h] * p[e] -> [B, K, H, E], a key/value gradient block, transposed.

  The contraction runs over the rows of both operands. Asked for as [.., H, E] (the key axis
  minor), XLA:CPU transposes only the small x block and the product is a plain YNNPACK GEMM;
  asked for as [.., E, H] the output layout sends it to a slower generic dot. So the backward
  accumulates dk and dv as [B, K, H, S] and transposes each once at the end.
  """
  return ops.einsum("bkcgh,bkcge->bkhe", x_BKCGH, p_BKCGE, preferred_element_type=jnp.float32)


def _blocked_causal_bwd(block, residuals, do_BKTGH):
  """Flash-attention backward: probabilities are recomputed per block from the saved
  log-sum-exp, so nothing of size T x T outlives a block (and no stacked T x T residual is
  written per layer under the layer scan)."""
  q_BKTGH, k_BKSH, v_BKSH, o_BKTGH, lse_BKTG = residuals
  dt = q_BKTGH.dtype
  delta_BKTG = jnp.sum(do_BKTGH.astype(jnp.float32) * o_BKTGH.astype(jnp.float32), axis=-1)
  B, K, S, H = k_BKSH.shape
  dk_BKHS = jnp.zeros((B, K, H, S), jnp.float32)
  dv_BKHS = jnp.zeros((B, K, H, S), jnp.float32)
  dq = []
  for start, stop in _query_blocks(q_BKTGH.shape[2], block):
    q_BKCGH, do_BKCGH = q_BKTGH[:, :, start:stop], do_BKTGH[:, :, start:stop]
    k_BKEH, v_BKEH = k_BKSH[:, :, :stop], v_BKSH[:, :, :stop]
    s_BKCGE = _block_scores(q_BKCGH, k_BKSH, start)
    p_BKCGE = jnp.exp(s_BKCGE - lse_BKTG[:, :, start:stop, :, None])
    dv_BKHS = dv_BKHS.at[..., :stop].add(_contract_rows(do_BKCGH, p_BKCGE.astype(dt)))
    dp_BKCGE = ops.einsum("bkcgh,bkeh->bkcge", do_BKCGH, v_BKEH, preferred_element_type=jnp.float32)
    ds_BKCGE = (p_BKCGE * (dp_BKCGE - delta_BKTG[:, :, start:stop, :, None])).astype(dt)
    dq.append(ops.einsum("bkcge,bkeh->bkcgh", ds_BKCGE, k_BKEH,
                     preferred_element_type=jnp.float32).astype(dt))
    dk_BKHS = dk_BKHS.at[..., :stop].add(_contract_rows(q_BKCGH, ds_BKCGE))
  return (jnp.concatenate(dq, axis=2), jnp.swapaxes(dk_BKHS, 2, 3).astype(dt),
          jnp.swapaxes(dv_BKHS, 2, 3).astype(v_BKSH.dtype))


_blocked_causal.defvjp(_blocked_causal_fwd, _blocked_causal_bwd)


def blocked_causal_attention(q_BTNH, k_BTKH, v_BTKH, block=CPU_BLOCK):
  """Causal self-attention that skips the masked upper triangle, for XLA:CPU.

  On CPU the step is bound by how many FLOPs and bytes its few large ops move (jax#26145), and
  the reference spends half of both on scores that the causal mask throws away. Here query rows
  are cut into blocks of `block`, and block i only multiplies against keys [0, end of block i):
  for T=512 and blocks of 256 that is 3/4 of the full score matrix (blocks of 128: 5/8, yet the
  training step measured slower with them; docs/benchmarks.md). Shapes stay static (a
  Python loop over blocks), so every product is one batched GEMM with batch dims (B, K) leading
  and the contraction dim minor, which XLA:CPU runs without copies. Grouped query heads are
  folded into the rows of each kv head ([B, K, T, G, H]), never repeated. The backward
  recomputes probabilities from the log-sum-exp (flash-attention style), which on CPU is
  cheaper than writing and re-reading stacked T x T probabilities.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = N // K
  q_BKTGH = jnp.transpose((q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype)).reshape(B, T, K, G, H),
                          (0, 2, 1, 3, 4))
  k_BKSH = jnp.transpose(k_BTKH, (0, 2, 1, 3))
  v_BKSH = jnp.transpose(v_BTKH, (0, 2, 1, 3))
  o_BKTGH = _blocked_causal(q_BKTGH, k_BKSH, v_BKSH, block)
  return jnp.transpose(o_BKTGH, (0, 2, 1, 3, 4)).reshape(B, T, N, H)


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
  chosen = resolve(impl, q_BTNH, S)
  if chosen == "cudnn" and plain_causal:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True,
                                        implementation="cudnn")
  if chosen == "cpu" and plain_causal and T == S:
    return blocked_causal_attention(q_BTNH, k_BSKH, v_BSKH)
  if q_positions_BT is None:
    q_positions_BT = jnp.broadcast_to(jnp.arange(S - T, S, dtype=jnp.int32), (B, T))
  if kv_positions_BS is None:
    kv_positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  mask_BTS = causal_mask(q_positions_BT, kv_positions_BS, kv_valid_BS)
  return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)


def max_logits(q_BTNH, k_BTKH):
  """Largest causal attention logit q.k / sqrt(H) of each query head over the batch, fp32 [N].

  What QK-clip (`optim.qk_clip`) watches. Computed on its own from q and k under stop_gradient,
  so it adds one forward score product per layer (B*N*T*T*H multiply-adds, no backward) to
  whichever attention implementation runs; only steps with QK-clip enabled ask for it.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  q_BTKGH = jax.lax.stop_gradient(q_BTNH).reshape(B, T, K, N // K, H)
  k_BTKH = jax.lax.stop_gradient(k_BTKH)
  s_BKGTS = ops.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BTKH,
                       preferred_element_type=jnp.float32) * (H ** -0.5)
  causal_TS = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
  s_BKGTS = jnp.where(causal_TS, s_BKGTS, -jnp.inf)
  return jnp.max(s_BKGTS, axis=(0, 3, 4)).reshape(N)
