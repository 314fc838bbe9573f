"""The fast paths give the reference numbers: block-causal CPU attention, the RMSNorm and fused
linear cross-entropy custom VJPs; and `auto` picks the CPU attention on CPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain import attention, model as model_lib, trainer

SMALL = model_lib.ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                              d_ff=80, max_seq_len=64, attention="xla")


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _outputs_and_grads(fn, *inputs_and_cotangent):
  """fn's output and its input gradients for the cotangent given as the last argument."""
  *inputs, cotangent = inputs_and_cotangent
  out, vjp = jax.vjp(fn, *inputs)
  return (out, *vjp(cotangent))


def _assert_bfloat16_as_accurate_as_autodiff(plain_fn, fast_fn, args):
  """Against fp32 on the same (bf16-rounded) inputs, the fast path's outputs and gradients keep
  bf16 dtypes and err no more than plain bf16 autodiff's."""
  truth = _outputs_and_grads(plain_fn, *(a.astype(jnp.float32) for a in args))
  plain = _outputs_and_grads(plain_fn, *args)
  ours = _outputs_and_grads(fast_fn, *args)
  for t, p, o in zip(truth, plain, ours):
    assert o.dtype == p.dtype == jnp.bfloat16 and o.shape == p.shape
    err = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32) - t)))
    assert err(o) <= 1.5 * err(p) + 1e-3


@pytest.mark.parametrize("T,N,K,block", [
    (16, 4, 4, 4),    # several blocks, multi-head
    (21, 6, 2, 8),    # T not a multiple of the block, grouped-query heads
    (12, 8, 1, 128),  # one block larger than T, multi-query
])
def test_cpu_attention_matches_the_reference_values_and_gradients(T, N, K, block):
  B, H = 2, 16
  q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, T, K, H)), _normal(2, (B, T, K, H))
  do = _normal(3, (B, T, N, H))
  ref = _outputs_and_grads(functools.partial(attention.attention, impl="xla"), q, k, v, do)
  cpu = _outputs_and_grads(
      functools.partial(attention.blocked_causal_attention, block=block), q, k, v, do)
  for name, a, b in zip(("out", "dq", "dk", "dv"), ref, cpu):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=2e-5, err_msg=name)


def test_cpu_attention_in_bfloat16_stays_close_to_fp32():
  B, T, N, H = 2, 24, 4, 16
  q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, T, N, H)), _normal(2, (B, T, N, H))
  ref = attention.attention(q, k, v, impl="xla")
  out = attention.blocked_causal_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), block=8)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2)


def test_auto_picks_cpu_attention_on_cpu_and_cpu_can_be_requested():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU backend only")
  q = jnp.ones((1, 4, 2, 8))
  assert attention.resolve("auto", q) == "cpu"
  assert attention.resolve("cpu", q) == "cpu"
  assert attention.resolve("xla", q) == "xla"
  assert "cpu" in attention.IMPLEMENTATIONS


def test_cpu_attention_with_kv_cache_positions_uses_the_reference():
  """Decoding passes positions; the block-causal path is for training/prefill only."""
  B, T, S, N, H = 2, 3, 8, 4, 8
  q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, S, N, H)), _normal(2, (B, S, N, H))
  q_pos = jnp.broadcast_to(jnp.arange(4, 4 + T), (B, T))
  kv_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
  kwargs = dict(q_positions_BT=q_pos, kv_positions_BS=kv_pos, kv_valid_BS=kv_pos < 7)
  np.testing.assert_array_equal(np.asarray(attention.attention(q, k, v, impl="cpu", **kwargs)),
                                np.asarray(attention.attention(q, k, v, impl="xla", **kwargs)))


def _loss_and_grads(c, params, tokens):
  graphdef = nnx.graphdef(model_lib.create(c, seed=1))

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("changes", [dict(attention="cpu"), dict(attention="auto"),
                                     dict(attention="cpu", scan_layers=False),
                                     dict(attention="cpu", remat="full")])
def test_model_with_cpu_paths_gives_the_reference_loss_and_gradients(changes):
  tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, SMALL.vocab_size)
  _, params = model_lib.params_of(model_lib.create(SMALL, seed=1))
  ref_loss, ref_grads = _loss_and_grads(dataclasses.replace(SMALL, remat="dots"), params, tokens)
  loss, grads = _loss_and_grads(dataclasses.replace(SMALL, **changes), params, tokens)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def _plain_rms_norm(x, scale, eps=1e-5):
  x32 = x.astype(jnp.float32)
  variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return (x32 * jax.lax.rsqrt(variance + eps)).astype(x.dtype) * scale


def _rms_norm_inputs(dtype):
  x = 3 * _normal(20, (2, 5, 16), dtype)
  scale = (1 + 0.1 * _normal(21, (16,))).astype(dtype)
  return x, scale, _normal(22, (2, 5, 16), dtype)


def test_rms_norm_custom_vjp_matches_autodiff():
  args = _rms_norm_inputs(jnp.float32)
  ours = functools.partial(model_lib.rms_norm, eps=1e-5)
  for a, b in zip(_outputs_and_grads(_plain_rms_norm, *args), _outputs_and_grads(ours, *args)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_rms_norm_custom_vjp_in_bfloat16_is_as_accurate_as_autodiff():
  """The backward recomputes the normalisation in fp32, so its error must not exceed autodiff's."""
  _assert_bfloat16_as_accurate_as_autodiff(
      _plain_rms_norm, functools.partial(model_lib.rms_norm, eps=1e-5),
      _rms_norm_inputs(jnp.bfloat16))


def test_linear_custom_vjp_matches_autodiff_and_keeps_dtypes():
  """model.linear only rewrites the weight gradient's product order (x^T dy): the same values as
  autodiff of the plain einsum, in fp32 and bf16, under jit and under the `dots` remat policy."""
  plain = lambda x, w: jnp.einsum("btd,df->btf", x, w)
  policy = jax.checkpoint_policies.save_only_these_names(*model_lib.SAVED_BY_DOTS)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    args = (_normal(30, (2, 6, 16), dtype), _normal(31, (16, 24), dtype),
            _normal(32, (2, 6, 24), dtype))
    expected = _outputs_and_grads(plain, *args)
    for ours in (model_lib.linear, jax.jit(model_lib.linear),
                 jax.checkpoint(model_lib.linear, policy=policy)):
      for a, b in zip(expected, _outputs_and_grads(ours, *args)):
        assert b.dtype == a.dtype
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                                   atol=tol, rtol=tol)


def _reference_cross_entropy(h, w, t, m):
  logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32))
  return -jnp.sum(jnp.take_along_axis(logp, t[..., None], -1)[..., 0] * m)


@pytest.mark.parametrize("chunk", [0, 12, 1, 4, 5])
def test_fused_cross_entropy_matches_autodiff_of_the_plain_loss(chunk):
  """Values and gradients for h, w and the mask, with and without chunks (5 does not divide 12:
  one chunk), eager and under jit."""
  h, w = _normal(0, (2, 12, 8)), _normal(1, (8, 50))
  t = jax.random.randint(jax.random.key(2), (2, 12), 0, 50)
  m = (jax.random.uniform(jax.random.key(3), (2, 12)) > 0.3).astype(jnp.float32)
  fused = lambda h, w, m: trainer.cross_entropy_sum(h, w, t, m, chunk=chunk)
  ref = lambda h, w, m: _reference_cross_entropy(h, w, t, m)
  np.testing.assert_allclose(float(fused(h, w, m)), float(ref(h, w, m)), rtol=1e-5)
  expected = jax.grad(ref, (0, 1, 2))(h, w, m)
  for grad_fn in (jax.grad(fused, (0, 1, 2)), jax.jit(jax.grad(fused, (0, 1, 2)))):
    for a, b in zip(expected, grad_fn(h, w, m)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=1e-5)


def test_fused_cross_entropy_in_bfloat16_keeps_gradient_dtypes():
  h, w = _normal(0, (2, 8, 16), jnp.bfloat16), _normal(1, (16, 40))
  t = jax.random.randint(jax.random.key(2), (2, 8), 0, 40)
  dh, dw = jax.grad(lambda h, w: trainer.cross_entropy_sum(h, w, t), (0, 1))(h, w)
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  ref_dh, ref_dw = jax.grad(
      lambda h, w: _reference_cross_entropy(h, w.astype(jnp.bfloat16), t, 1.0), (0, 1))(h, w)
  np.testing.assert_allclose(np.asarray(dh, np.float32), np.asarray(ref_dh, np.float32), atol=2e-2)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(ref_dw), atol=5e-2, rtol=5e-2)
