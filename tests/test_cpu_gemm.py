"""OpenBLAS matrix products (jaxtrain/cpu_gemm.py): the same values and gradients as XLA's dots,
the model's einsums mapped onto them, and `model.matmul` resolved as documented."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import attention, cpu_gemm, model as model_lib, sharding, trainer
from jaxtrain.errors import UserError


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_built_and_loaded_wherever_a_cxx_compiler_is_present():
  # The install compiles the handler when it can; a broken build must not pass unnoticed.
  if not (shutil.which("c++") or shutil.which("g++")):
    pytest.skip("no C++ compiler on this machine")
  assert cpu_gemm.unavailable_reason() is None
  assert cpu_gemm.resolve("auto", jnp.float32) == "blas"


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,k,n,batch", [
    (200, 24, 40, None),  # split into pieces by rows
    (24, 40, 300, None),  # split into pieces by columns
    (7, 5, 3, None),      # smaller than one piece
    (33, 16, 20, 3),      # a batch of products
])
def test_matmul_values_and_gradients_match_xla(trans_a, trans_b, m, k, n, batch):
  lead = () if batch is None else (batch,)
  a = _normal(0, lead + ((k, m) if trans_a else (m, k)))
  b = _normal(1, lead + ((n, k) if trans_b else (k, n)))
  op = lambda x, t: jnp.swapaxes(x, -1, -2) if t else x
  ref = lambda a, b: jnp.matmul(op(a, trans_a), op(b, trans_b))
  ours = lambda a, b: cpu_gemm.matmul(a, b, trans_a, trans_b)
  cotangent = _normal(2, lead + (m, n))
  for f in (ref, ours):
    out, vjp = jax.vjp(jax.jit(f), a, b)
    if f is ref:
      want = (out, *vjp(cotangent))
    else:
      got = (out, *vjp(cotangent))
  for name, w, g in zip(("out", "da", "db"), want, got):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-4, err_msg=name)


def test_mismatched_operands_are_an_error_before_anything_runs():
  with pytest.raises(ValueError, match="is not a matrix product"):
    cpu_gemm.matmul(jnp.ones((3, 4)), jnp.ones((5, 2)))
  with pytest.raises(ValueError, match="is not a matrix product"):
    cpu_gemm.matmul(jnp.ones((2, 3, 4)), jnp.ones((3, 4, 2)))


def test_empty_contraction_gives_zeros():
  out = jax.jit(cpu_gemm.matmul)(jnp.ones((3, 0)), jnp.ones((0, 4)))
  np.testing.assert_array_equal(np.asarray(out), np.zeros((3, 4)))


@pytest.mark.parametrize("spec,a_shape,b_shape", [
    ("btd,dg->btg", (2, 5, 8), (8, 6)),           # projection
    ("btd,dmh->btmh", (2, 5, 8), (8, 3, 4)),      # into heads
    ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 8)),   # out of heads
    ("btk,dk->btd", (2, 5, 12), (8, 12)),         # input gradient (b transposed)
    ("btd,btf->df", (2, 5, 8), (2, 5, 6)),        # weight gradient (a transposed)
    ("btd,btf->fd", (2, 5, 8), (2, 5, 6)),        # output in b's order: operands swapped
    ("bkcgh,bksh->bkcgs", (2, 3, 4, 2, 5), (2, 3, 6, 5)),  # attention scores: batch axes b, k
    ("bkcgh,bkcge->bkhe", (2, 3, 4, 2, 5), (2, 3, 4, 2, 6)),  # a key gradient block
])
def test_einsum_matches_jnp_einsum_with_gradients(spec, a_shape, b_shape):
  a, b = _normal(0, a_shape), _normal(1, b_shape)
  loss = lambda e: jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(e(spec, a, b))), (0, 1)))
  want, got = loss(jnp.einsum)(a, b), loss(cpu_gemm.einsum)(a, b)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,a_shape,b_shape,message", [
    ("bth,sbh->bts", (2, 4, 5), (6, 2, 5), "batch axes"),
    ("btd,dg->bgt", (2, 5, 8), (8, 6), "batch axes|free axes"),
    ("bdt,dg->btg", (2, 8, 5), (8, 6), "interleaved"),
    ("btd,dg->btg", (2, 5, 8), (7, 6), "axis d"),
])
def test_einsum_rejects_what_one_matrix_product_cannot_do(spec, a_shape, b_shape, message):
  with pytest.raises(ValueError, match=message):
    cpu_gemm.einsum(spec, jnp.zeros(a_shape), jnp.zeros(b_shape))


def test_cpu_attention_with_blas_matches_xla_products():
  B, T, N, K, H = 2, 21, 6, 2, 16
  q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, T, K, H)), _normal(2, (B, T, K, H))
  do = _normal(3, (B, T, N, H))

  def out_and_grads(einsum):
    f = lambda q, k, v: attention.blocked_causal_attention(q, k, v, block=8, einsum=einsum)
    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    return (out, *vjp(do))

  for name, want, got in zip(("out", "dq", "dk", "dv"), out_and_grads(jnp.einsum),
                             out_and_grads(cpu_gemm.einsum)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5,
                               err_msg=name)


def test_resolve_follows_backend_dtype_and_mesh():
  assert cpu_gemm.resolve("xla", jnp.float32) == "xla"
  assert cpu_gemm.resolve("auto", jnp.bfloat16) == "xla"
  with pytest.raises(UserError, match=r"model\.matmul=blas cannot run: the compute dtype is bf"):
    cpu_gemm.resolve("blas", jnp.bfloat16)
  with pytest.raises(UserError, match=r"model\.matmul='mkl'"):
    cpu_gemm.resolve("mkl", jnp.float32)
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=1), jax.devices()[:2])
  with jax.set_mesh(mesh):
    assert cpu_gemm.resolve("auto", jnp.float32) == "xla"
    with pytest.raises(UserError, match="partitioned over 2 devices"):
      cpu_gemm.resolve("blas", jnp.float32)


def test_without_the_library_auto_falls_back_and_blas_says_why(monkeypatch):
  monkeypatch.setattr(cpu_gemm, "unavailable_reason", lambda: "jaxtrain/_cpu_gemm was not built")
  assert cpu_gemm.resolve("auto", jnp.float32) == "xla"
  assert cpu_gemm.einsum_for("auto", jnp.float32) is cpu_gemm.xla_einsum
  with pytest.raises(UserError, match="model.matmul=blas cannot run: jaxtrain/_cpu_gemm was not"):
    cpu_gemm.resolve("blas", jnp.float32)


def test_a_handler_this_jaxlib_refuses_is_a_reason_not_a_crash(monkeypatch):
  # What jaxlib 0.11.2 said of a handler built against a newer jaxlib's FFI headers.
  refusal = jax.errors.JaxRuntimeError(
      "INVALID_ARGUMENT: XLA FFI handler registration for jaxtrain_cpu_gemm on platform Host "
      "failed because the handler's API version (0.5) is incompatible with the framework's API "
      "version (0.4).\nmore detail")

  def refuse(*args, **kwargs):
    raise refusal

  monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
  if cpu_gemm.host_malloc.built_library("_cpu_gemm") is None:
    pytest.skip("jaxtrain/_cpu_gemm is not built here")
  reason = cpu_gemm._load.__wrapped__()  # Uncached: the registered handler stays as it is.
  assert reason.endswith("does not fit this jaxlib {} (INVALID_ARGUMENT: XLA FFI handler "
                         "registration for jaxtrain_cpu_gemm on platform Host failed because the "
                         "handler's API version (0.5) is incompatible with the framework's API "
                         "version (0.4).); reinstall jaxtrain".format(jax.lib.__version__))


SMALL = model_lib.ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                              d_ff=80, max_seq_len=64)


@pytest.mark.parametrize("changes", [{}, dict(attention="xla"), dict(remat="full"),
                                     dict(scan_layers=False)])
def test_model_with_blas_gives_xla_loss_and_gradients(changes):
  tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, SMALL.vocab_size)
  _, params = model_lib.params_of(model_lib.create(SMALL, seed=1))

  def loss_and_grads(c):
    graphdef = model_lib.params_of(model_lib.abstract_model(c))[0]
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    loss = lambda p: trainer.loss_sum_and_count(p, graphdef, batch, loss_chunk=8)[0]
    return jax.jit(jax.value_and_grad(loss))(params)

  ref_loss, ref_grads = loss_and_grads(dataclasses.replace(SMALL, matmul="xla", **changes))
  loss, grads = loss_and_grads(dataclasses.replace(SMALL, matmul="blas", **changes))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_dots_remat_policy_keeps_xla_dots_under_auto():
  assert model_lib.matmul_choice(dataclasses.replace(SMALL, remat="dots")) == "xla"
  assert model_lib.matmul_choice(dataclasses.replace(SMALL, remat="dots", matmul="blas")) == "blas"
  assert model_lib.matmul_choice(SMALL) == "auto"


def test_xla_einsum_upcasts_low_precision_operands_for_a_float32_result_on_cpu():
  a, b = _normal(0, (2, 8, 16)).astype(jnp.bfloat16), _normal(1, (2, 8, 12)).astype(jnp.bfloat16)
  f = lambda x, y: cpu_gemm.xla_einsum("btd,btf->df", x, y, preferred_element_type=jnp.float32)
  dots = [e for e in jax.make_jaxpr(f)(a, b).eqns if e.primitive.name == "dot_general"]
  assert [v.aval.dtype for v in dots[0].invars] == [jnp.float32, jnp.float32]
  expected = jnp.einsum("btd,btf->df", a.astype(jnp.float32), b.astype(jnp.float32))
  np.testing.assert_array_equal(jax.jit(f)(a, b), expected)
  # A bf16 result is left to XLA as it is.
  g = lambda x, y: cpu_gemm.xla_einsum("btd,btf->df", x, y)
  dots = [e for e in jax.make_jaxpr(g)(a, b).eqns if e.primitive.name == "dot_general"]
  assert [v.aval.dtype for v in dots[0].invars] == [jnp.bfloat16, jnp.bfloat16]
