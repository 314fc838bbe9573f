"""Jitted decoding over a per-layer KV cache: bucketed prefill, insert, multi-step decode, sampling.

JetStream / jax-llm-examples style, as pure functions over the model's config and
`model.serving_weights(model)`:

  prefill(config, weights, tokens_BT, lengths_B, sampling)  -> (first token, prefix cache)
  insert(state, prefix, first_B, sampling, slot)            -> decode state, rows filled
  release(state, slot)                                      -> decode state, the slot free
  decode(config, weights, state, steps, rows)               -> (state, tokens [steps, rows])

Prompts are right-padded to a power-of-two bucket, so prefill compiles once per bucket; decode
compiles once per (slots, cache length, steps, rows); nothing is retraced per token or per request
(`TRACES` counts traces, tests check it). The cache is donated to decode and insert, so it is
updated in place. The layers run unrolled over per-layer weight and cache buffers
(`model.serving_weights`, `model.KVCache`): no layer slice is ever copied.

Sampling (per row, so rows of one batch may ask for different things): greedy when the
temperature is 0, otherwise logits / temperature, then top-k, then top-p, as HF and vLLM order
them. Each request has its own key; the token at position p is drawn with fold_in(key, p), so a
sample depends on the request alone, never on its batch-mates or on its slot.
"""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import model as model_lib

# How many times each jitted function was traced (compiled), by name. A test warms up and then
# checks that serving more requests adds nothing here.
TRACES = collections.Counter()

MIN_BUCKET = 16


def bucket(n, minimum=MIN_BUCKET):
  """The smallest power of two >= n (and >= minimum)."""
  b = minimum
  while b < n:
    b *= 2
  return b


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampling:
  """Per-row sampling parameters; `key_B2` is each request's raw threefry key data."""
  temperature_B: jax.Array
  top_k_B: jax.Array
  top_p_B: jax.Array
  key_B2: jax.Array

  @classmethod
  def make(cls, temperature, top_k, top_p, seeds):
    """From Python lists (one entry per row)."""
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])
    return cls(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
               jnp.asarray(top_p, jnp.float32), jnp.asarray(keys, jnp.uint32))

  @classmethod
  def empty(cls, batch):
    return cls(jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32),
               jnp.ones((batch,), jnp.float32), jnp.zeros((batch, 2), jnp.uint32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Everything decode carries between dispatches: the cache, each row's last token (not yet
  in the cache) and its sampling parameters."""
  cache: model_lib.KVCache
  tokens_B: jax.Array
  sampling: Sampling

  @classmethod
  def empty(cls, c, slots, length):
    return cls(model_lib.KVCache.empty(c, slots, length), jnp.zeros((slots,), jnp.int32),
               Sampling.empty(slots))


def sample(logits_BV, positions_B, sampling):
  """One token per row; see the module docstring. All-greedy batches skip the sort."""

  def greedy(_):
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  def stochastic(_):
    t_B = sampling.temperature_B
    scaled_BV = logits_BV / jnp.where(t_B > 0, t_B, 1.0)[:, None]
    order_BV = jnp.argsort(-scaled_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(scaled_BV, order_BV, axis=-1)
    V = logits_BV.shape[-1]
    rank_V = jnp.arange(V, dtype=jnp.int32)
    k_B = jnp.where(sampling.top_k_B > 0, sampling.top_k_B, V)
    sorted_BV = jnp.where(rank_V[None, :] < k_B[:, None], sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass strictly above each token
    keep_BV = (before_BV < sampling.top_p_B[:, None]) | (rank_V[None, :] == 0)
    sorted_BV = jnp.where(keep_BV, sorted_BV, -jnp.inf)

    def draw(key2, pos, row_V):
      key = jax.random.fold_in(jax.random.wrap_key_data(key2), pos)
      return jax.random.categorical(key, row_V)

    choice_B = jax.vmap(draw)(sampling.key_B2, positions_B, sorted_BV)
    drawn_B = jnp.take_along_axis(order_BV, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(t_B > 0, drawn_B, greedy(None))

  return jax.lax.cond(jnp.all(sampling.temperature_B <= 0), greedy, stochastic, None)


@functools.partial(jax.jit, static_argnames=("config",))
def prefill(config, weights, tokens_BT, lengths_B, sampling):
  """(first generated token [B], prefix KVCache of length T) for right-padded prompts."""
  TRACES["prefill"] += 1
  h_BD, prefix = model_lib.prefill(config, weights, tokens_BT, lengths_B)
  return sample(model_lib.serving_logits(weights, h_BD), lengths_B, sampling), prefix


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(state, prefix, first_B, sampling, slot):
  """Put prefilled rows (and their first tokens and sampling) into slots [slot, slot + n)."""
  TRACES["insert"] += 1
  start = jnp.asarray(slot, jnp.int32)

  def put(big, small):
    index = (start,) + (jnp.zeros((), jnp.int32),) * (big.ndim - 1)
    return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), index)

  return DecodeState(state.cache.insert(prefix, slot), put(state.tokens_B, first_B),
                     jax.tree.map(put, state.sampling, sampling))


@functools.partial(jax.jit, donate_argnames=("state",))
def release(state, slot):
  """Free a slot: its length becomes 0, so decode leaves the row at 0 (`model.decode`) and it no
  longer widens the cache window the other rows read."""
  TRACES["release"] += 1
  cache = state.cache
  cache = model_lib.KVCache(cache.ks_BKSH, cache.vs_BKSH, cache.lengths_B.at[slot].set(0))
  return DecodeState(cache, state.tokens_B, state.sampling)


@functools.partial(jax.jit, static_argnames=("config", "steps", "rows"),
                   donate_argnames=("state",))
def decode(config, weights, state, steps, rows=None):
  """`steps` decoding steps in one dispatch; returns (state, tokens [steps, rows]).

  Each step feeds the last token of each of the first `rows` rows (all when None;
  `model.decode_rows` picks fewer when only low slots are occupied) at its own length and
  samples the next one for the position after it. Rows keep decoding after they finish (the
  host ignores those tokens); rows that reach the cache's end stop writing (`model.write_row`);
  rows past `rows` are left as they are.
  """
  TRACES["decode"] += 1
  b = state.tokens_B.shape[0] if rows is None else rows
  sampling = jax.tree.map(lambda x: x[:b], state.sampling)

  def step(state, _):
    h_bD, cache = model_lib.decode(config, weights, state.tokens_B[:b], state.cache)
    next_b = sample(model_lib.serving_logits(weights, h_bD), cache.lengths_B[:b], sampling)
    return DecodeState(cache, state.tokens_B.at[:b].set(next_b), state.sampling), next_b

  return jax.lax.scan(step, state, None, length=steps)
