"""Numerics shared by the model, the loss and Muon."""

import jax
import jax.numpy as jnp


def einsum(spec, a, b, *, preferred_element_type=None):
  """`jnp.einsum(spec, a, b)`, except that on the CPU backend low-precision operands asked for a
  float32 result are upcast first.

  XLA:CPU (jaxlib 0.10 and 0.11) has no unfused BF16 x BF16 = F32 dot ("Unsupported element type
  for DotThunk" at run time), and whether it fuses a dot depends on the dot's context, so the bf16
  step can fail on CPU. GPUs get the bf16 product with fp32 accumulation unchanged.
  """
  if (preferred_element_type == jnp.float32 and jax.default_backend() == "cpu"
      and (a.dtype != jnp.float32 or b.dtype != jnp.float32)):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=preferred_element_type)
