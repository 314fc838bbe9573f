"""fp32 matrix products on CPU through OpenBLAS, as XLA custom calls (`model.matmul`).

XLA:CPU runs dots through YNNPACK (jaxlib 0.10). On the 2-core machines of docs/benchmarks.md
OpenBLAS's sgemm runs the 35M model's products up to 1.6x faster alone (attention's small batched
ones gain most), and the 35M training step is ~12% faster with all of the model's matmuls here
(projections, MLP, head, attention's block products; docs/benchmarks.md). `einsum` below is a
drop-in for the model's two-operand `jnp.einsum`s: it reshapes to matrices or batches of them (no
copies: row-major merges only) and calls the FFI handler of jaxtrain/csrc/cpu_gemm.cc, which
splits each product over XLA's own intra-op threads and runs single-threaded OpenBLAS on each
piece. It is differentiable (the gradients are matrix products again).

`model.matmul` chooses: `xla` (XLA's dots everywhere), `blas` (this module; an error where it
cannot run) or `auto` (the default: `blas` where it can run, else `xla`). It can run where

- the library was built (`pip install` compiles jaxtrain/csrc/cpu_gemm.cc when a C++ compiler is
  there) and OpenBLAS loads (the `scipy-openblas32` dependency),
- the backend is CPU, the compute dtype float32,
- the computation is not partitioned over several devices (a mesh of one device or none): a
  custom call has no sharding rule, so GSPMD would gather its operands onto every device.

GPUs never take this path: their dots stay XLA's (cuBLAS), unchanged.
"""

import ctypes
import functools
import os
import string

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import host_malloc
from jaxtrain.errors import UserError

IMPLEMENTATIONS = ("auto", "xla", "blas")
TARGET = "jaxtrain_cpu_gemm"


@functools.lru_cache(maxsize=None)
def _load():
  """Loads OpenBLAS and our handler and registers it once: None when ready, else the reason."""
  path = host_malloc.built_library("_cpu_gemm")
  if path is None:
    return ("jaxtrain/_cpu_gemm was not built (no C++ compiler or no jaxlib FFI headers when "
            "jaxtrain was installed)")
  try:
    import scipy_openblas32  # pylint: disable=import-outside-toplevel
    openblas = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(),
                                        scipy_openblas32.get_library(fullname=True)),
                           mode=ctypes.RTLD_GLOBAL)
    sgemm = openblas.scipy_cblas_sgemm
    set_threads = openblas.scipy_openblas_set_num_threads
  except (ImportError, OSError, AttributeError, IndexError) as e:
    return f"OpenBLAS from the scipy-openblas32 package did not load: {e}"
  try:
    library = ctypes.CDLL(path)
    set_sgemm, handler = library.jaxtrain_cpu_gemm_set_sgemm, library.JaxtrainCpuGemm
  except (OSError, AttributeError) as e:
    return f"{path} did not load (a stale build? reinstall jaxtrain): {e}"
  # The handler splits every product over XLA's threads itself; OpenBLAS threads would compete.
  set_threads(1)
  set_sgemm(ctypes.cast(sgemm, ctypes.c_void_p))
  try:
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
  except jax.errors.JaxRuntimeError as e:
    # XLA refuses a handler built against newer FFI headers than its own (pyproject.toml builds
    # against jaxlib 0.7.2's, which every jaxlib we support accepts; a build without isolation
    # takes the installed jaxlib's).
    return (f"{path} does not fit this jaxlib {jax.lib.__version__} ({str(e).splitlines()[0]}); "
            "reinstall jaxtrain")
  return None


def unavailable_reason():
  """Why this module cannot run here (None when it can): library or OpenBLAS missing."""
  return _load()


def resolve(choice, dtype, key="model.matmul"):
  """The implementation that runs (`xla` or `blas`) for `key=choice`, at trace time.

  An explicit `blas` that cannot run is a one-line UserError naming the key; `auto` falls back.
  """
  if choice not in IMPLEMENTATIONS:
    raise UserError(f"{key}={choice!r} is not one of {IMPLEMENTATIONS}")
  if choice == "xla":
    return "xla"
  mesh = jax.sharding.get_abstract_mesh()
  # The first reason that applies; the library is loaded only where nothing else rules it out.
  reason = ((jax.default_backend() != "cpu" and f"the backend is {jax.default_backend()}, not cpu")
            or (jnp.dtype(dtype) != jnp.float32
                and f"the compute dtype is {jnp.dtype(dtype).name}, not float32")
            or (mesh.size > 1 and f"the computation is partitioned over {mesh.size} devices")
            or unavailable_reason())
  if not reason:
    return "blas"
  if choice == "blas":
    raise UserError(f"{key}=blas cannot run: {reason} (use {key}=auto or xla)")
  return "xla"


def _call(a, b, trans_a, trans_b):
  """The custom call on rank-3 operands: out[i] = op(a[i]) @ op(b[i])."""
  m = a.shape[2] if trans_a else a.shape[1]
  n = b.shape[1] if trans_b else b.shape[2]
  out = jax.ShapeDtypeStruct((a.shape[0], m, n), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out)(a, b, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(a, b, trans_a=False, trans_b=False):
  """op(a) @ op(b) for float32 matrices ([M, K] x [K, N]) or batches of them ([B, M, K] ...).

  `op` transposes the last two axes where `trans_a` / `trans_b` say, for free (BLAS reads the
  operand transposed). Needs `unavailable_reason()` to be None.
  """
  if a.ndim != b.ndim or a.ndim not in (2, 3):
    raise ValueError(f"matmul takes two matrices or two batches of them, got {a.shape} x {b.shape}")
  if a.dtype != jnp.float32 or b.dtype != jnp.float32:
    raise ValueError(f"matmul is float32 only, got {a.dtype} x {b.dtype}")
  k_a = a.shape[-2] if trans_a else a.shape[-1]
  k_b = b.shape[-1] if trans_b else b.shape[-2]
  if k_a != k_b or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(f"matmul: {a.shape} x {b.shape} with trans_a={trans_a}, trans_b={trans_b} "
                     "is not a matrix product")
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"jaxtrain.cpu_gemm cannot run: {reason}")
  if a.ndim == 2:
    return _call(a[None], b[None], trans_a, trans_b)[0]
  return _call(a, b, trans_a, trans_b)


def _matmul_fwd(a, b, trans_a, trans_b):
  return matmul(a, b, trans_a, trans_b), (a, b)


def _matmul_bwd(trans_a, trans_b, residuals, dout):
  # out = op(a) op(b): d op(a) = dout op(b)^T and d op(b) = op(a)^T dout, each written as one
  # product with transpose flags, never a transposed copy.
  a, b = residuals
  if trans_a:
    da = matmul(b, dout, trans_b, True)
  else:
    da = matmul(dout, b, False, not trans_b)
  if trans_b:
    db = matmul(dout, a, True, trans_a)
  else:
    db = matmul(a, dout, not trans_a, False)
  return da, db


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _transposed(axes, rows, cols):
  """False when `axes` are `rows` then `cols` (a row-major matrix), True when `cols` then `rows`
  (its transpose as stored), None when neither."""
  if axes == rows + cols:
    return False
  return True if axes == cols + rows else None


@functools.lru_cache(maxsize=None)
def _plan(spec, a_shape, b_shape):
  """How `einsum(spec)` maps onto `matmul`: (trans_a, trans_b, a_shape, b_shape, out_shape) with
  the operands' shapes as matrices (or batches of matrices), or a ValueError.

  Supported: batch axes (in both operands and the output) lead all three in the same order; every
  other axis is either contracted (in both operands, not in the output) or free (in one operand and
  the output), and each operand holds its free and contracted axes as two contiguous groups in the
  order the output and the other operand use. Then the operands become matrices, or batches of
  them, by merging adjacent axes (a reshape, no copy). This covers the model's projections and
  attention's products, and their gradients.
  """
  inputs, out = spec.replace(" ", "").split("->")
  a_axes, b_axes = inputs.split(",")
  if (len(a_axes) != len(a_shape) or len(b_axes) != len(b_shape)
      or any(c not in string.ascii_letters for c in a_axes + b_axes + out)):
    raise ValueError(f"einsum {spec!r} does not match operands {a_shape} x {b_shape}")
  sizes = dict(zip(a_axes, a_shape))
  for axis, size in zip(b_axes, b_shape):
    if sizes.setdefault(axis, size) != size:
      raise ValueError(f"einsum {spec!r}: axis {axis} is {sizes[axis]} and {size}")
  batch = ""
  while (len(batch) < min(len(a_axes), len(b_axes), len(out))
         and a_axes[len(batch)] == b_axes[len(batch)] == out[len(batch)]):
    batch += out[len(batch)]
  a_axes, b_axes, out = a_axes[len(batch):], b_axes[len(batch):], out[len(batch):]
  contracted = "".join(c for c in a_axes if c in b_axes and c not in out)
  m_axes = "".join(c for c in out if c in a_axes and c not in b_axes)
  n_axes = "".join(c for c in out if c in b_axes and c not in a_axes)
  if out != m_axes + n_axes:
    raise ValueError(f"einsum {spec!r}: output must be batch axes (leading all three), then a's "
                     "free axes, then b's")
  if sorted(a_axes) != sorted(m_axes + contracted) or sorted(b_axes) != sorted(n_axes + contracted):
    raise ValueError(f"einsum {spec!r}: every axis must be contracted or in the output")
  a_contracted = "".join(c for c in a_axes if c in contracted)
  trans_a = _transposed(a_axes, m_axes, a_contracted)
  if trans_a is None:
    raise ValueError(f"einsum {spec!r}: a's free and contracted axes are interleaved")
  trans_b = _transposed(b_axes, a_contracted, n_axes)
  if trans_b is None:
    raise ValueError(f"einsum {spec!r}: b's contracted axes are not in a's order, or interleaved")
  size = lambda axes: int(np.prod([sizes[c] for c in axes], dtype=np.int64))
  m, n, k = size(m_axes), size(n_axes), size(a_contracted)
  lead = (size(batch),) if batch else ()
  a_matrices = lead + ((k, m) if trans_a else (m, k))
  b_matrices = lead + ((n, k) if trans_b else (k, n))
  return trans_a, trans_b, a_matrices, b_matrices, tuple(sizes[c] for c in batch + out)


def einsum(spec, a, b, *, preferred_element_type=None):
  """`jnp.einsum(spec, a, b)` for float32 operands as one OpenBLAS product (see `_plan`)."""
  if preferred_element_type not in (None, jnp.float32):
    raise ValueError(f"einsum here computes float32 only, not {preferred_element_type}")
  inputs, out = spec.replace(" ", "").split("->")
  a_axes, b_axes = inputs.split(",")
  if out and out[0] in b_axes and out[0] not in a_axes:
    # The output starts with b's free axes: the same product with the operands swapped.
    a, b, spec = b, a, f"{b_axes},{a_axes}->{out}"
  trans_a, trans_b, a_matrices, b_matrices, out_shape = _plan(spec, a.shape, b.shape)
  with jax.named_scope(spec):  # Profiles name the custom call by its einsum, as XLA's dots.
    return matmul(a.reshape(a_matrices), b.reshape(b_matrices), trans_a, trans_b).reshape(out_shape)


def xla_einsum(spec, a, b, *, preferred_element_type=None):
  """`jnp.einsum(spec, a, b)` (XLA's dot), except that on the CPU backend bf16 or f16 operands
  asked for a float32 result are upcast first: XLA:CPU's unfused dot has no BF16 x BF16 = F32
  kernel (jaxlib 0.10 and 0.11 fail at run time: "Unsupported element type for DotThunk"), and
  whether it fuses a dot depends on the dot's context (the bf16 training step had one it did not
  fuse). Elsewhere (GPUs) nothing changes."""
  if (preferred_element_type == jnp.float32 and jax.default_backend() == "cpu"
      and (a.dtype != jnp.float32 or b.dtype != jnp.float32)):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=preferred_element_type)


def einsum_for(choice, dtype, key="model.matmul"):
  """The einsum to use for `key=choice` at this trace: this module's, or `xla_einsum`."""
  return einsum if resolve(choice, dtype, key) == "blas" else xla_einsum
