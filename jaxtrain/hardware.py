"""Device peaks for MFU. Dense figures only (never the 2:4 sparsity ones), from DESIGN.md.

On CPU there is no datasheet number that means anything for XLA, so the peak is measured: the
FLOP/s of a large jitted fp32 matmul on this machine, labelled as measured; where jaxtrain runs its
CPU matmuls through OpenBLAS (jaxtrain/cpu_gemm.py), the faster of XLA's dot and that product.
"""

import functools
import time

import jax
import jax.numpy as jnp

from jaxtrain import cpu_gemm

# device_kind substring -> {compute dtype: dense peak TFLOP/s per device}. Order matters: the
# first match wins, so more specific names come first.
PEAK_TFLOPS = (
    ("h100 pcie", {"bfloat16": 756.0, "float16": 756.0}),
    ("h100", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    ("h200", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    ("a100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("a40", {"bfloat16": 149.7, "float16": 149.7, "float32": 37.4}),
)

# Memory bandwidth in GB/s, for decoding (memory-bound) efficiency.
BANDWIDTH_GBS = (("h100", 3350.0), ("h200", 4800.0), ("a100", 2039.0), ("a40", 696.0))


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(n: int = 2048, repeats: int = 5, kind: str = "xla") -> float:
  """Median TFLOP/s of a jitted fp32 n x n matmul on the default device: XLA's dot (`xla`) or
  jaxtrain.cpu_gemm's OpenBLAS product (`blas`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(cpu_gemm.matmul if kind == "blas" else jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  times.sort()
  return 2 * n ** 3 / times[len(times) // 2] / 1e12


def device_peak_tflops(dtype: str, device=None):
  """(peak TFLOP/s per device, source) for the compute dtype: table or measured on CPU."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for name, peaks in PEAK_TFLOPS:
    if name in kind:
      dt = dtype if dtype in peaks else "bfloat16"
      return peaks[dt], f"{name} dense {dt} (table)"
  if device.platform == "cpu":
    if cpu_gemm.unavailable_reason() is None:
      return (max(measured_matmul_tflops(), measured_matmul_tflops(kind="blas")),
              "measured fp32 matmul, best of XLA's and OpenBLAS's")
    return measured_matmul_tflops(), "measured fp32 matmul"
  return None, f"unknown device {device.device_kind!r}"


def device_bandwidth_gbs(device=None):
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for name, gbs in BANDWIDTH_GBS:
    if name in kind:
      return gbs
  return None
