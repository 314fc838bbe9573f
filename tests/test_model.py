"""The LLaMA model: causality, scan == unrolled, remat == no remat, attention implementations
agree, sizes and config errors.
(KV-cache decoding: tests/test_generate.py.)"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain import attention, model as model_lib
from jaxtrain.errors import UserError

SMALL = model_lib.ModelConfig(vocab_size=97, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2,
                              d_ff=80, max_seq_len=64, attention="xla")


@pytest.fixture(scope="module")
def small_model():
  return model_lib.create(SMALL, seed=1)


def _tokens(B=2, T=16, V=97, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def test_changing_token_t_never_changes_earlier_logits(small_model):
  tokens = _tokens()
  t = 9
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % SMALL.vocab_size)
  a, b = small_model(tokens), small_model(changed)
  np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
  assert not np.allclose(np.asarray(a[:, t:]), np.asarray(b[:, t:]))


def test_logits_are_fp32_even_with_bf16_compute():
  c = dataclasses.replace(SMALL, dtype="bfloat16")
  logits = model_lib.create(c, seed=1)(_tokens())
  assert logits.dtype == jnp.float32 and logits.shape == (2, 16, 97)


def _logits_with(c, tokens, seed=1):
  graphdef, params = model_lib.params_of(model_lib.create(SMALL, seed=seed))
  graphdef = nnx.graphdef(model_lib.create(c, seed=seed))
  return nnx.merge(graphdef, params)(tokens)


def test_scan_and_unrolled_layers_give_the_same_logits(small_model):
  tokens = _tokens()
  unrolled = _logits_with(dataclasses.replace(SMALL, scan_layers=False), tokens)
  np.testing.assert_allclose(np.asarray(small_model(tokens)), np.asarray(unrolled),
                             atol=1e-5, rtol=1e-5)


def _grads(c, tokens):
  graphdef = nnx.graphdef(model_lib.create(c, seed=1))
  _, params = model_lib.params_of(model_lib.create(SMALL, seed=1))

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_the_same_gradients(policy):
  tokens = _tokens()
  base = _grads(SMALL, tokens)
  other = _grads(dataclasses.replace(SMALL, remat=policy), tokens)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def _naive_attention(q, k, v):
  """Repeat kv heads and apply a lower-triangular softmax: the textbook definition."""
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  T = q.shape[1]
  s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v)


def test_attention_implementations_agree_with_the_textbook_definition():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 10, 8, 16))
  k = jax.random.normal(kk, (2, 10, 2, 16))
  v = jax.random.normal(kv, (2, 10, 2, 16))
  expected = np.asarray(_naive_attention(q, k, v))
  for impl in ("xla", "auto"):
    np.testing.assert_allclose(np.asarray(attention.attention(q, k, v, impl=impl)), expected,
                               atol=1e-5)
  with warnings.catch_warnings(record=True):
    warnings.simplefilter("always")
    out = attention.attention(q, k, v, impl="cudnn")  # Falls back to xla off-GPU.
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_cudnn_request_off_gpu_falls_back_with_a_warning():
  if jax.default_backend() == "gpu":
    pytest.skip("cuDNN is available here")
  attention._warn_once.cache_clear()
  q = jnp.ones((1, 4, 2, 8))
  with pytest.warns(UserWarning, match="falling back to xla"):
    attention.resolve("cudnn", q)


def test_llama3_rope_scaling_changes_only_low_frequencies():
  base = model_lib.rope_frequencies(dataclasses.replace(SMALL, head_dim=64, n_heads=6))
  scaled = model_lib.rope_frequencies(dataclasses.replace(
      SMALL, head_dim=64, rope_scaling_factor=8.0, rope_original_max_seq_len=64))
  wavelen = 2 * np.pi / base
  high = wavelen < 64 / 4  # Short wavelengths are kept.
  low = wavelen > 64 / 1  # Long wavelengths are divided by the factor.
  np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
  np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-6)


def test_sizes_have_the_advertised_parameter_counts():
  import importlib.util
  spec = importlib.util.spec_from_file_location("llama_cfg", "configs/llama.py")
  llama = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(llama)
  expected = {"toy": 10e6, "35m": 35e6, "125m": 125e6, "350m": 350e6, "760m": 760e6,
              "1.4b": 1.4e9}
  for size, target in expected.items():
    c = model_lib.ModelConfig.from_config(llama.get_config(size).model)
    counts = model_lib.param_counts(c)
    _, abstract = model_lib.params_of(model_lib.abstract_model(c))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == counts["total"]
    assert abs(counts["total"] / target - 1) < 0.1, (size, counts["total"])
  c14 = model_lib.ModelConfig.from_config(llama.get_config("1.4b").model)
  assert model_lib.param_counts(c14)["total"] == 1_402_046_464


def test_flops_per_token_follows_the_design_formula():
  c = model_lib.ModelConfig(vocab_size=100, d_model=16, n_layers=2, n_heads=2, d_ff=32)
  matmul = 2 * (4 * 16 * 16 + 3 * 16 * 32)
  assert model_lib.flops_per_token(c, 8) == 6 * matmul + 6 * 100 * 16 + 6 * 2 * 16 * 8


@pytest.mark.parametrize("changes, key", [
    (dict(n_heads=5), "model.n_heads"),
    (dict(n_kv_heads=4), "model.n_kv_heads"),
    (dict(d_model=0), "model.d_model"),
    (dict(dtype="float8"), "model.dtype"),
    (dict(attention="flash"), "model.attention"),
    (dict(remat="some"), "model.remat"),
    (dict(rope_theta=-1.0), "model.rope_theta"),
])
def test_bad_model_config_is_a_one_line_error_naming_the_key(changes, key):
  values = {**dataclasses.asdict(SMALL), **changes}
  with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
    model_lib.ModelConfig.from_config(values)
  assert "\n" not in str(e.value)


def test_unknown_model_key_is_rejected():
  with pytest.raises(UserError, match="model.n_expert"):
    model_lib.ModelConfig.from_config({"n_expert": 8})
