"""The LLaMA family in Flax NNX: RMSNorm, RoPE (with llama3 scaling), GQA attention, SwiGLU.

Layers are always stored stacked, every block parameter with a leading layer axis L, so that the
parameter tree (and hence checkpoints, optimizer routing and sharding) is the same whether the
layers run under `jax.lax.scan` (compile time independent of depth) or unrolled.

Conventions match HF transformers' `LlamaForCausalLM` so that checkpoints convert by reshapes only:
rotary embeddings rotate the two halves of each head (`rotate_half`), RMSNorm normalises in fp32
and multiplies the scale after casting back, and there are no biases.

Every parameter carries `logical_axes` metadata; `sharding.py` maps those names to mesh axes.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtrain import attention as attention_lib
from jaxtrain import ops, sharding
from jaxtrain.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of one model. Field names follow the config file (`model.*`)."""
  vocab_size: int = 4096  # Token ids 0..vocab_size-1; covers the tokenizer (bpe trains this many).
  d_model: int = 320  # Width of the residual stream.
  n_layers: int = 6  # Transformer blocks.
  n_heads: int = 5  # Query heads.
  n_kv_heads: int = 0  # 0: same as n_heads (multi-head attention).
  d_ff: int = 864  # Hidden width of the SwiGLU MLP.
  head_dim: int = 0  # 0: d_model // n_heads.
  max_seq_len: int = 2048  # Longest sequence the model accepts (data.seq_len, prompt + generation).
  rope_theta: float = 10000.0  # RoPE base frequency.
  # llama3 rope scaling; factor 0 disables it.
  rope_scaling_factor: float = 0.0
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original/low are fully scaled.
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original/high are kept.
  rope_original_max_seq_len: int = 8192  # llama3: the context length before scaling.
  norm_eps: float = 1e-5  # RMSNorm epsilon.
  tie_embeddings: bool = False  # LM head shares the input embedding table.
  dtype: str = "float32"  # Compute dtype of activations and matmuls (bfloat16 on GPUs).
  param_dtype: str = "float32"  # Storage dtype of the (master) parameters.
  attention: str = "auto"  # auto: cudnn where supported, cpu on CPU, xla elsewhere.
  remat: str = "none"  # Recompute in the backward: none, full, or dots (keep matmul outputs).
  scan_layers: bool = True  # lax.scan over layers (compile time independent of depth).
  init_std: float = 0.02  # Normal init std; output projections get init_std / sqrt(2 n_layers).

  @classmethod
  def from_config(cls, cfg):
    """From a ConfigDict or mapping; unknown keys are an error naming the key."""
    values = dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in names:
        raise UserError(f"model.{key} is not a model config key (known: {', '.join(sorted(names))})")
    c = cls(**values)
    c.validate()
    return c

  @property
  def kv_heads(self):
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self):
    return self.head_dim or self.d_model // max(self.n_heads, 1)

  def validate(self):
    """One-line errors naming the key; cheap, runs before anything is built."""
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
      value = getattr(self, key)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise UserError(f"model.{key} must be a positive integer, got {value!r}")
    if self.n_kv_heads < 0 or self.head_dim < 0:
      raise UserError("model.n_kv_heads and model.head_dim must be >= 0 (0 means default)")
    if not self.head_dim and self.d_model % self.n_heads:
      raise UserError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
    if self.n_heads % self.kv_heads:
      raise UserError(f"model.n_kv_heads={self.kv_heads} does not divide model.n_heads={self.n_heads}")
    if self.dim_per_head % 2:
      raise UserError(f"head dim {self.dim_per_head} must be even for rotary embeddings")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise UserError(f"model.{key}={getattr(self, key)!r} is not one of {sorted(DTYPES)}")
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise UserError(f"model.attention={self.attention!r} is not one of "
                      f"{attention_lib.IMPLEMENTATIONS}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"model.remat={self.remat!r} is not one of {REMAT_POLICIES}")
    if self.rope_theta <= 0:
      raise UserError(f"model.rope_theta must be > 0, got {self.rope_theta}")
    if self.rope_scaling_factor < 0:
      raise UserError(f"model.rope_scaling_factor must be >= 0, got {self.rope_scaling_factor}")
    if self.rope_scaling_factor and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise UserError("model.rope_high_freq_factor must be > model.rope_low_freq_factor")
    if self.norm_eps <= 0:
      raise UserError(f"model.norm_eps must be > 0, got {self.norm_eps}")
    if self.init_std <= 0:
      raise UserError(f"model.init_std must be > 0, got {self.init_std}")


# ---------------------------------------------------------------------------------------------
# Parameter counting and FLOPs (the formula of DESIGN.md), computed from the config alone.


def param_counts(c: ModelConfig):
  """Parameter counts: total, embedding (input table), head, non-embedding."""
  D, F, L, V = c.d_model, c.d_ff, c.n_layers, c.vocab_size
  NH, KH = c.n_heads * c.dim_per_head, c.kv_heads * c.dim_per_head
  attn = D * NH + 2 * D * KH + NH * D
  mlp = 3 * D * F
  per_layer_matmul = attn + mlp
  norms = L * 2 * D + D
  embedding = V * D
  head = 0 if c.tie_embeddings else V * D
  matmul = L * per_layer_matmul
  return {"total": embedding + head + matmul + norms, "embedding": embedding, "head": head,
          "non_embedding": head + matmul + norms, "matmul": matmul, "norms": norms}


def flops_per_token(c: ModelConfig, seq_len: int):
  """Training FLOPs per token: 6*N_matmul + 6*N_head + 6*L*d*T.

  N_matmul counts the q/k/v/o and MLP kernels of every block; the head counts even when it is
  tied to the embedding (the matmul still happens). Attention scores and values cost 12*L*d*T per
  token for full attention, counted here as half (6*L*d*T) since causal attention skips the upper
  triangle. With d the attention width n_heads * head_dim.
  """
  counts = param_counts(c)
  head = c.vocab_size * c.d_model
  attn_width = c.n_heads * c.dim_per_head
  return 6 * counts["matmul"] + 6 * head + 6 * c.n_layers * attn_width * seq_len


# ---------------------------------------------------------------------------------------------
# Modules. Parameter creation takes the layer count so stacked parameters are made directly.


def _param(rngs, shape, std, dtype, axes):
  value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim, eps, param_dtype, *, layers=None):
    stack = () if layers is None else (layers,)
    stack_axes = () if layers is None else ("layers",)
    self.eps = eps
    self.scale = nnx.Param(jnp.ones(stack + (dim,), param_dtype), logical_axes=stack_axes + ("norm",))

  def __call__(self, x_BTD):
    return rms_norm(x_BTD, self.scale[...].astype(x_BTD.dtype), self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x_BTD, scale_D, eps):
  """x / sqrt(mean(x^2) + eps) * scale, normalised in fp32, with a backward that saves only x.

  Autodiff of the formula saves x, 2x (from the square's derivative) and the normalised x for
  every norm: under the layer scan each is a stacked [L, B, T, D] buffer written in the forward.
  Here the backward recomputes the (cheap, elementwise) normalisation from x instead, so a layer
  writes two of those buffers fewer per norm.
  """
  return _rms_norm_fwd(x_BTD, scale_D, eps)[0]


def _rms_normalise(x_BTD, eps):
  x32_BTD = x_BTD.astype(jnp.float32)
  inv_BT1 = jax.lax.rsqrt(jnp.mean(x32_BTD * x32_BTD, axis=-1, keepdims=True) + eps)
  return x32_BTD * inv_BT1, inv_BT1


def _rms_norm_fwd(x_BTD, scale_D, eps):
  normed_BTD = _rms_normalise(x_BTD, eps)[0].astype(x_BTD.dtype)
  return normed_BTD * scale_D, (x_BTD, scale_D)


def _rms_norm_bwd(eps, residuals, dy_BTD):
  x_BTD, scale_D = residuals
  normed_BTD, inv_BT1 = _rms_normalise(x_BTD, eps)
  dy32_BTD = dy_BTD.astype(jnp.float32)
  dscale_D = jnp.sum(dy32_BTD * normed_BTD, axis=tuple(range(dy_BTD.ndim - 1)))
  g_BTD = dy32_BTD * scale_D.astype(jnp.float32)
  # d/dx of x * inv(x): inv * (g - normed * mean(g * normed)).
  dx_BTD = inv_BT1 * (g_BTD - normed_BTD * jnp.mean(g_BTD * normed_BTD, axis=-1, keepdims=True))
  return dx_BTD.astype(x_BTD.dtype), dscale_D.astype(scale_D.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rope_frequencies(c: ModelConfig):
  """Inverse frequencies of rotary embeddings, with llama3 scaling when configured."""
  H = c.dim_per_head
  inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
  if c.rope_scaling_factor:
    factor = c.rope_scaling_factor
    old_len = c.rope_original_max_seq_len
    low_wavelen = old_len / c.rope_low_freq_factor
    high_wavelen = old_len / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_tables(positions_BT, inv_freq_h):
  """cos and sin of the rotary angles, [B, T, 1, H/2] each.

  They depend on positions only, so the model computes them once per forward pass instead of in
  every layer (inside the layer scan they would be recomputed L times, and again in the backward).
  """
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq_h
  return jnp.cos(angles_BTh)[:, :, None, :], jnp.sin(angles_BTh)[:, :, None, :]


def rotate(x_BTNH, cos_BT1h, sin_BT1h):
  """Rotate each head's two halves by the tabulated angles (HF `rotate_half` layout)."""
  x32_BTNH = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x32_BTNH, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h], -1)
  return rotated.astype(x_BTNH.dtype)


def apply_rope(x_BTNH, positions_BT, inv_freq_h):
  """Rotate each head's two halves by position-dependent angles (HF `rotate_half` layout)."""
  return rotate(x_BTNH, *rope_tables(positions_BT, inv_freq_h))


# Activations that the `dots` remat policy saves (named with `checkpoint_name`): the projection
# outputs the backward needs (q, k, v, the attention output, gate and up), so it recomputes only
# norms and elementwise work. The o and down projections' outputs are not needed (their weight
# gradients read the saved attention output and silu(gate) * up).
SAVED_BY_DOTS = ("q_proj", "k_proj", "v_proj", "attention", "mlp_gate", "mlp_up")
_name = checkpoint_name


class Attention(nnx.Module):

  def __init__(self, c: ModelConfig, *, layers, rngs):
    D, N, K, H = c.d_model, c.n_heads, c.kv_heads, c.dim_per_head
    pd = DTYPES[c.param_dtype]
    std = c.init_std
    out_std = c.init_std / math.sqrt(2 * c.n_layers)
    self.wq = _param(rngs, (layers, D, N, H), std, pd, ("layers", "embed", "heads", "head_dim"))
    self.wk = _param(rngs, (layers, D, K, H), std, pd, ("layers", "embed", "kv_heads", "head_dim"))
    self.wv = _param(rngs, (layers, D, K, H), std, pd, ("layers", "embed", "kv_heads", "head_dim"))
    self.wo = _param(rngs, (layers, N, H, D), out_std, pd, ("layers", "heads", "head_dim", "embed"))

  def __call__(self, x_BTD, positions_BT, rope, impl, max_logits=False):
    """(output [B, T, D], each head's largest attention logit [N] if `max_logits`, else None).

    QK-clip (optim/qk_clip.py) reads the max logits. Decoding has its own function over fused
    weights (`serving_layer`)."""
    dt = x_BTD.dtype
    heads = ("batch", "seq", "heads", "head_dim")
    kv_heads = ("batch", "seq", "kv_heads", "head_dim")

    def project(w, name, axes):
      y = jnp.einsum("btd,dnh->btnh", x_BTD, w[...].astype(dt))
      return sharding.constrain(_name(y, name), axes)

    q_BTNH = rotate(project(self.wq, "q_proj", heads), *rope)
    k_BTKH = rotate(project(self.wk, "k_proj", kv_heads), *rope)
    v_BTKH = project(self.wv, "v_proj", kv_heads)
    out_BTNH = attention_lib.attention(q_BTNH, k_BTKH, v_BTKH, impl=impl)
    max_N = attention_lib.max_logits(q_BTNH, k_BTKH) if max_logits else None
    out_BTNH = sharding.constrain(_name(out_BTNH, "attention"), heads)
    return jnp.einsum("btnh,nhd->btd", out_BTNH, self.wo[...].astype(dt)), max_N


@jax.custom_vjp
def linear(x_BTD, w_DF):
  """x @ w (an MLP projection), with the weight gradient written as x^T dy.

  JAX's own transpose rule writes the weight gradient as (dy^T x)^T, and XLA:CPU then transposes
  the wide dy ([B*T, F]) in the fusion that computes it (the SwiGLU backward; measured in
  docs/benchmarks.md); written x^T dy, XLA transposes the narrow x, which gate and up share.
  The values and what is saved (x and w; under remat what the policy names) are autodiff's
  (tests/test_perf_paths.py). On GPUs cuBLAS takes either order as transpose flags, so it should
  change nothing there (not measured).
  """
  return jnp.einsum("btd,df->btf", x_BTD, w_DF)


def _linear_fwd(x_BTD, w_DF):
  return linear(x_BTD, w_DF), (x_BTD, w_DF)


def _linear_bwd(residuals, dy_BTF):
  x_BTD, w_DF = residuals
  return (jnp.einsum("btf,df->btd", dy_BTF, w_DF).astype(x_BTD.dtype),
          jnp.einsum("btd,btf->df", x_BTD, dy_BTF).astype(w_DF.dtype))


linear.defvjp(_linear_fwd, _linear_bwd)


class MLP(nnx.Module):

  def __init__(self, c: ModelConfig, *, layers, rngs):
    D, F = c.d_model, c.d_ff
    pd = DTYPES[c.param_dtype]
    out_std = c.init_std / math.sqrt(2 * c.n_layers)
    self.w_gate = _param(rngs, (layers, D, F), c.init_std, pd, ("layers", "embed", "mlp"))
    self.w_up = _param(rngs, (layers, D, F), c.init_std, pd, ("layers", "embed", "mlp"))
    self.w_down = _param(rngs, (layers, F, D), out_std, pd, ("layers", "mlp", "embed"))

  def __call__(self, x_BTD):
    """SwiGLU: silu(x @ w_gate) * (x @ w_up) @ w_down."""
    dt = x_BTD.dtype
    hidden = ("batch", "seq", "mlp")

    def project(w, name):
      y_BTF = linear(x_BTD, w[...].astype(dt))
      return sharding.constrain(_name(y_BTF, name), hidden)

    h_BTF = jax.nn.silu(project(self.w_gate, "mlp_gate")) * project(self.w_up, "mlp_up")
    return linear(h_BTF, self.w_down[...].astype(dt))


class Blocks(nnx.Module):
  """All transformer blocks, parameters stacked on a leading layer axis.

  `__call__` slices one layer's parameters at a time (scan or Python loop) and merges them into
  this same module structure, so the block code below is written for a single layer.
  """

  def __init__(self, c: ModelConfig, *, rngs):
    L = c.n_layers
    pd = DTYPES[c.param_dtype]
    self.attn_norm = RMSNorm(c.d_model, c.norm_eps, pd, layers=L)
    self.attn = Attention(c, layers=L, rngs=rngs)
    self.mlp_norm = RMSNorm(c.d_model, c.norm_eps, pd, layers=L)
    self.mlp = MLP(c, layers=L, rngs=rngs)

  def layer(self, x_BTD, positions_BT, rope, impl, max_logits=False):
    """One block; `self` holds a single layer's parameters here. `rope`: (cos, sin) tables.
    Returns (x, the attention's per-head max logits or None)."""
    residual = ("batch", "seq", "embed")
    h_BTD, max_N = self.attn(self.attn_norm(x_BTD), positions_BT, rope, impl, max_logits)
    x_BTD = sharding.constrain(x_BTD + h_BTD, residual)
    x_BTD = sharding.constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD)), residual)
    return x_BTD, max_N


def _remat(fn, policy):
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*SAVED_BY_DOTS))


class Llama(nnx.Module):
  """Decoder-only LLaMA. `model(tokens_BT)` gives fp32 logits [B, T, V]."""

  def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
    self.config = c
    D, V = c.d_model, c.vocab_size
    pd = DTYPES[c.param_dtype]
    self.embed = nnx.Embed(V, D, param_dtype=pd, dtype=DTYPES[c.dtype],
                           embedding_init=nnx.initializers.normal(c.init_std), rngs=rngs)
    self.embed.embedding.set_metadata(logical_axes=("vocab", "embed"))
    self.blocks = Blocks(c, rngs=rngs)
    self.final_norm = RMSNorm(D, c.norm_eps, pd)
    if not c.tie_embeddings:
      self.lm_head = nnx.Linear(D, V, use_bias=False, param_dtype=pd,
                                kernel_init=nnx.initializers.normal(c.init_std), rngs=rngs)
      self.lm_head.kernel.set_metadata(logical_axes=("embed", "vocab"))

  def head_kernel(self):
    """The (D, V) output projection, the embedding's transpose when tied."""
    if self.config.tie_embeddings:
      return self.embed.embedding[...].T
    return self.lm_head.kernel[...]

  def hidden_states(self, tokens_BT, positions_BT=None, with_max_logits=False):
    """Final-normed hidden states [B, T, D] in the compute dtype.

    `with_max_logits` returns (hidden states, each layer's per-head max attention logit [L, N])."""
    c = self.config
    dt = DTYPES[c.dtype]
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    rope = rope_tables(positions_BT, jnp.asarray(rope_frequencies(c)))
    x_BTD = sharding.constrain(self.embed(tokens_BT).astype(dt), ("batch", "seq", "embed"))
    graphdef, stacked = nnx.split(self.blocks)

    def body(x_BTD, layer_state):
      layer = nnx.merge(graphdef, layer_state)
      return layer.layer(x_BTD, positions_BT, rope, c.attention, with_max_logits)

    body = _remat(body, c.remat)
    if c.scan_layers:
      def scan_body(x_BTD, layer_state):
        return body(x_BTD, layer_state)
      x_BTD, max_logits_LN = jax.lax.scan(scan_body, x_BTD, stacked)
    else:
      per_layer = []
      for i in range(c.n_layers):
        layer_state = jax.tree.map(lambda a, i=i: a[i], stacked)
        x_BTD, layer_max_N = body(x_BTD, layer_state)
        per_layer.append(layer_max_N)
      max_logits_LN = jnp.stack(per_layer) if with_max_logits else None
    x_BTD = self.final_norm(x_BTD)
    return (x_BTD, max_logits_LN) if with_max_logits else x_BTD

  def logits(self, x_BTD):
    """fp32 logits from hidden states: the matmul accumulates and returns fp32."""
    w_DV = self.head_kernel().astype(x_BTD.dtype)
    return ops.einsum("btd,dv->btv", x_BTD, w_DV, preferred_element_type=jnp.float32)

  def __call__(self, tokens_BT):
    return self.logits(self.hidden_states(tokens_BT))


def write_row(cache_BKSH, new_bKH, positions_b):
  """Row b's new key (or value) at position positions_b[b], for the first b rows of the cache;
  at or past S it is dropped."""
  rows_b = jnp.arange(new_bKH.shape[0])
  return cache_BKSH.at[rows_b, :, positions_b].set(new_bKH.astype(cache_BKSH.dtype), mode="drop")


def cache_windows(S, platform=None):
  """The cache prefixes decode attention may read: multiples of S/8 (at least 16 positions) on
  XLA:CPU, only all of S elsewhere.

  XLA:CPU copies each window's slice before its products and still gains (docs/benchmarks.md,
  Decode). On a GPU a copied slice would cost more than it saves past a third of the cache, and
  whether XLA:GPU fuses the slice into the products is not measured yet, so GPUs read all of it.
  """
  if (platform or jax.default_backend()) != "cpu":
    return (S,)
  return tuple(sorted({min(S, max(16, -(-S * i // 8))) for i in range(1, 9)}))


def decode_rows(occupied, slots, platform=None):
  """How many leading rows of `slots` a decode step computes when the highest occupied slot is
  `occupied - 1`: on XLA:CPU the smallest power of two >= occupied (at most `slots`), elsewhere
  all of them.

  Fewer rows make every weight product and the attention smaller, so one user of an 8-slot
  server decodes at the speed of a 1-row batch (vLLM likewise batches only the running
  requests). On XLA:CPU the rows come out of the cache in the window's slice, which it copies
  anyway (`cache_windows`); on a GPU the rows would be an extra copy of the cache, so GPUs
  compute all slots. Powers of two bound the compilations to log2(slots) + 1.
  """
  if (platform or jax.default_backend()) != "cpu":
    return slots
  rows = 1
  while rows < occupied:
    rows *= 2
  return min(rows, slots)


def decode_attention(q_b1NH, k_b1KH, v_b1KH, k_BKSH, v_BKSH, lengths_b):
  """One query per row over its cached keys [0, length) and its own new key, for the first b
  rows of the cache (b = the queries' rows, `decode_rows`).

  Only a prefix of the cache is read: the smallest of `cache_windows(S)` that holds the longest
  row (a `lax.switch` over static slices), so a step early in a long cache reads a fraction of
  it, as paged attention reads only the real lengths. The result is the same as reading all S.
  """
  S = k_BKSH.shape[2]
  windows = cache_windows(S)
  if len(windows) == 1:
    return _decode_window(S, q_b1NH, k_b1KH, v_b1KH, k_BKSH, v_BKSH, lengths_b)
  index = jnp.searchsorted(jnp.asarray(windows, jnp.int32), jnp.max(lengths_b))
  branches = [functools.partial(_decode_window, w) for w in windows]
  # lax.switch clamps the index: rows at or past S (full) read the last window, all of S.
  return jax.lax.switch(index, branches, q_b1NH, k_b1KH, v_b1KH, k_BKSH, v_BKSH, lengths_b)


def _decode_window(w, q_b1NH, k_b1KH, v_b1KH, k_BKSH, v_BKSH, lengths_b):
  b, S = q_b1NH.shape[0], k_BKSH.shape[2]
  if (b, w) != (k_BKSH.shape[0], S):  # one slice (a copy on XLA:CPU) of rows and positions
    k_BKSH, v_BKSH = k_BKSH[:b, :, :w], v_BKSH[:b, :, :w]
  return _decode_attention(q_b1NH, k_b1KH, v_b1KH, k_BKSH, v_BKSH, lengths_b)


def _decode_attention(q_B1NH, k_B1KH, v_B1KH, k_BKSH, v_BKSH, lengths_B):
  """`decode_attention` over all of the (possibly sliced) cache it is given.

  The new key is scored separately and joined at the (tiny) score level, so the cache is read
  once and never copied (a concatenation would copy all of it in every layer). The cache
  layout [B, K, S, H] is the one both products want (batch dims first: no transpose per step).
  fp32 softmax.
  """
  B, _, N, H = q_B1NH.shape
  K, S = k_BKSH.shape[1], k_BKSH.shape[2]
  q_BKGH = q_B1NH[:, 0].reshape(B, K, N // K, H).astype(jnp.float32) * (H ** -0.5)
  q_BKGH = q_BKGH.astype(k_BKSH.dtype)
  s_BKGS = ops.einsum("bkgh,bksh->bkgs", q_BKGH, k_BKSH, preferred_element_type=jnp.float32)
  valid_BS = jnp.arange(S, dtype=jnp.int32)[None, :] < lengths_B[:, None]
  s_BKGS = jnp.where(valid_BS[:, None, None, :], s_BKGS, -jnp.inf)
  s_BKG1 = ops.einsum("bkgh,bkh->bkg", q_BKGH, k_B1KH[:, 0].astype(k_BKSH.dtype),
                      preferred_element_type=jnp.float32)[..., None]
  m_BKG1 = jnp.maximum(jnp.max(s_BKGS, axis=-1, keepdims=True), s_BKG1)
  p_BKGS = jnp.exp(s_BKGS - m_BKG1)
  p_BKG1 = jnp.exp(s_BKG1 - m_BKG1)
  denom_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True) + p_BKG1
  o_BKGH = ops.einsum("bkgs,bksh->bkgh", p_BKGS.astype(v_BKSH.dtype), v_BKSH,
                      preferred_element_type=jnp.float32)
  o_BKGH = o_BKGH + p_BKG1 * v_B1KH[:, 0][:, :, None, :].astype(jnp.float32)
  o_BKGH = o_BKGH / denom_BKG1
  return o_BKGH.reshape(B, 1, N, H).astype(q_B1NH.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values, one [B, K, S, H] buffer per layer (tuples of L), and each row's length.

  Row b holds positions [0, lengths_B[b]); the next token of row b is written at its length.
  A write at or past S is dropped (the sequence is full), never wrapped around. The layers are
  separate buffers rather than one stacked [L, ...] array because a layer slice of a stacked
  array is a copy on XLA:CPU (a decode step would copy the whole cache); each buffer is donated
  and updated in place.
  """
  ks_BKSH: tuple
  vs_BKSH: tuple
  lengths_B: jax.Array

  @classmethod
  def empty(cls, c: ModelConfig, batch, length, dtype=None):
    dtype = dtype or DTYPES[c.dtype]
    shape = (batch, c.kv_heads, length, c.dim_per_head)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(c.n_layers))
    return cls(zeros(), zeros(), jnp.zeros((batch,), jnp.int32))

  def insert(self, prefix, slot):
    """Copy a prefilled cache (rows [slot, slot + prefix batch), its length T <= S) in."""
    z = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(slot, jnp.int32), z, z, z)

    def put(big, small):
      return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), start)

    ks = tuple(map(put, self.ks_BKSH, prefix.ks_BKSH))
    vs = tuple(map(put, self.vs_BKSH, prefix.vs_BKSH))
    lengths = jax.lax.dynamic_update_slice(self.lengths_B, prefix.lengths_B, start[:1])
    return KVCache(ks, vs, lengths)


# ---------------------------------------------------------------------------------------------
# Decoding: prefill right-padded prompts, then decode one token per row at a time against a
# `KVCache`, as plain functions over `serving_weights` (jax-llm-examples style). The layers run
# unrolled over per-layer buffers: a layer slice of stacked weights (what a scan over the layers
# reads) is a copy on XLA:CPU, so a scanned decode step read every weight twice and wrote it once.


def serving_weights(model: Llama) -> dict:
  """The weights decoding reads, made once: {"embed" [V, D], "final_norm" [D], "head" [D, V],
  "layers": a tuple of L dicts}, every array in the compute dtype (a bf16 model with fp32 master
  weights reads half the bytes per token) and in its own buffer.

  Each layer's q/k/v kernels are joined into one [D, (N + 2K) H] product and gate/up into one
  [D, 2F] product: with a few rows per step these products are bound by weight reads and per-op
  cost, and fewer, larger ones run faster (measured on XLA:CPU: docs/benchmarks.md; vLLM's merged
  QKV and gate/up layers do the same on GPUs). Training keeps them apart, which tensor
  parallelism needs.
  """
  c = model.config
  dt = DTYPES[c.dtype]
  D = c.d_model
  _, params = params_of(model)
  blocks = params["blocks"]
  attn, mlp = blocks["attn"], blocks["mlp"]
  layers = []
  for i in range(c.n_layers):
    layers.append({
        "attn_norm": blocks["attn_norm"]["scale"][i].astype(dt),
        "wqkv": jnp.concatenate([attn[w][i].reshape(D, -1) for w in ("wq", "wk", "wv")],
                                axis=1).astype(dt),
        "wo": attn["wo"][i].reshape(-1, D).astype(dt),
        "mlp_norm": blocks["mlp_norm"]["scale"][i].astype(dt),
        "w_gate_up": jnp.concatenate([mlp["w_gate"][i], mlp["w_up"][i]], axis=1).astype(dt),
        "w_down": mlp["w_down"][i].astype(dt),
    })
  embed = params["embed"]["embedding"]
  head = embed.T if c.tie_embeddings else params["lm_head"]["kernel"]
  return {"embed": embed.astype(dt), "final_norm": params["final_norm"]["scale"].astype(dt),
          "head": jnp.array(head, dt), "layers": tuple(layers)}


def serving_bytes_per_step(weights: dict, batch: int) -> int:
  """Weight bytes one decode step reads: every layer, the final norm and the head, and `batch`
  rows of the embedding table."""
  embed = weights["embed"]
  rest = {k: v for k, v in weights.items() if k != "embed"}
  return (sum(int(x.nbytes) for x in jax.tree.leaves(rest))
          + batch * embed.shape[1] * embed.dtype.itemsize)


def serving_layer(c: ModelConfig, p: dict, x_BTD, rope, cache):
  """One block over fused weights `p` (`serving_weights`); returns (x, this layer's new cache).

  `cache` is None for prefill (the fast causal attention over the right-padded prompt, from
  position 0; returns its keys and values [B, T, K, H]) or (k_BKSH, v_BKSH, lengths_B) for a
  decode step of one token per row (T = 1, each row at its own length).
  """
  B, T, _ = x_BTD.shape
  N, K, H = c.n_heads, c.kv_heads, c.dim_per_head
  qkv_BTE = jnp.einsum("btd,de->bte", rms_norm(x_BTD, p["attn_norm"], c.norm_eps), p["wqkv"])
  q_BTNH = rotate(qkv_BTE[..., :N * H].reshape(B, T, N, H), *rope)
  k_BTKH = rotate(qkv_BTE[..., N * H:(N + K) * H].reshape(B, T, K, H), *rope)
  v_BTKH = qkv_BTE[..., (N + K) * H:].reshape(B, T, K, H)
  if cache is None:
    # Right-padded prompts: plain causal attention is exact for every real token, which never
    # sees the pads after it.
    out_BTNH = attention_lib.attention(q_BTNH, k_BTKH, v_BTKH, impl=c.attention)
    new_cache = (k_BTKH, v_BTKH)
  else:
    k_BKSH, v_BKSH, lengths_B = cache
    out_BTNH = decode_attention(q_BTNH, k_BTKH, v_BTKH, k_BKSH, v_BKSH, lengths_B)
    # The write comes after the reads so that it only feeds the carried cache and is done in
    # place: the written values depend on the attention output (adding 0 * one of its
    # elements), so XLA orders every read of the old cache first (without that XLA:CPU
    # copied each layer's cache twice per step).
    after_B11 = (out_BTNH[:, 0, :1, :1] * 0).astype(k_BTKH.dtype)
    new_cache = (write_row(k_BKSH, k_BTKH[:, 0] + after_B11, lengths_B),
                 write_row(v_BKSH, v_BTKH[:, 0] + after_B11, lengths_B))
  x_BTD = x_BTD + jnp.einsum("bte,ed->btd", out_BTNH.reshape(B, T, N * H), p["wo"])
  gu_BTG = jnp.einsum("btd,dg->btg", rms_norm(x_BTD, p["mlp_norm"], c.norm_eps), p["w_gate_up"])
  gate_BTF, up_BTF = jnp.split(gu_BTG, 2, axis=-1)
  return x_BTD + jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BTF) * up_BTF, p["w_down"]), new_cache


def _run_serving_layers(c, weights, tokens_BT, positions_BT, caches):
  rope = rope_tables(positions_BT, jnp.asarray(rope_frequencies(c)))
  x_BTD = weights["embed"][tokens_BT]
  outputs = []
  for p, cache in zip(weights["layers"], caches):
    x_BTD, out = serving_layer(c, p, x_BTD, rope, cache)
    outputs.append(out)
  return x_BTD, outputs


def prefill(c: ModelConfig, weights: dict, tokens_BT, lengths_B):
  """Prompts right-padded to T, `lengths_B` real tokens each.

  Returns the final-normed hidden state at each row's last real token [B, D] (so the caller
  computes one row of logits, not T) and a `KVCache` of length T holding the prompts.
  """
  B, T = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x_BTD, kv = _run_serving_layers(c, weights, tokens_BT, positions_BT, [None] * c.n_layers)
  last_B = jnp.clip(lengths_B - 1, 0, T - 1)
  x_BD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]
  ks = tuple(k_BTKH.transpose(0, 2, 1, 3) for k_BTKH, _ in kv)
  vs = tuple(v_BTKH.transpose(0, 2, 1, 3) for _, v_BTKH in kv)
  x_BD = rms_norm(x_BD, weights["final_norm"], c.norm_eps)
  return x_BD, KVCache(ks, vs, lengths_B.astype(jnp.int32))


def decode(c: ModelConfig, weights: dict, tokens_b, cache):
  """One decoding step for the first b = len(tokens_b) rows of the cache (all of them, or
  `decode_rows`): token i sits at position `cache.lengths_B[i]`.

  Each layer attends over its cache and the new key, then writes the new key and value into its
  own cache buffer (in place, each row at its own length; rows at or past the cache's end are
  dropped, never wrapped). Rows past b are neither read nor written and keep their lengths. A
  row of length 0 holds no request (`serving.generate.release`): it stays at 0, so free rows
  never widen the cache window the others read (`decode_attention`).
  Returns (final-normed hidden states [b, D], new cache).
  """
  b = tokens_b.shape[0]
  lengths_b = cache.lengths_B[:b]
  caches = [(k, v, lengths_b) for k, v in zip(cache.ks_BKSH, cache.vs_BKSH)]
  x_b1D, kv = _run_serving_layers(c, weights, tokens_b[:, None], lengths_b[:, None], caches)
  x_bD = rms_norm(x_b1D[:, 0], weights["final_norm"], c.norm_eps)
  lengths_B = cache.lengths_B.at[:b].add((lengths_b > 0).astype(jnp.int32))
  return x_bD, KVCache(tuple(k for k, _ in kv), tuple(v for _, v in kv), lengths_B)


def serving_logits(weights: dict, h_BD):
  """fp32 logits [B, V] of final-normed hidden states (as `Llama.logits`)."""
  return ops.einsum("bd,dv->bv", h_BD, weights["head"], preferred_element_type=jnp.float32)


def create(c: ModelConfig, seed: int = 0) -> Llama:
  """A freshly initialised model (under `jax.jit` with out_shardings it is created sharded).

  The key is JAX's default threefry, which is partitionable (`jax_threefry_partitionable`, on by
  default since JAX 0.5): each device generates only its own shard of every parameter, and the
  values are the same on every mesh (tests/test_train.py checks sharded == one device). `rbg`
  keys are not partitionable: on 8 devices each did 4x its share of the work.
  """
  return Llama(c, rngs=nnx.Rngs(params=jax.random.key(seed)))


def abstract_model(c: ModelConfig) -> Llama:
  """The model with ShapeDtypeStructs instead of arrays: free, even for 1.4B parameters."""
  return nnx.eval_shape(lambda: create(c))


def logical_axes(model: Llama) -> dict[str, Any]:
  """Nested dict (same structure as the params) of each parameter's logical axis names."""
  _, state = nnx.split(model, nnx.Param)
  axes = {}
  for path, variable in nnx.to_flat_state(state):
    node = axes
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(variable.get_metadata()["logical_axes"])
  return axes


def params_of(model: Llama) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, params as a pure nested dict of arrays); `nnx.merge(graphdef, params)` inverts."""
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)
