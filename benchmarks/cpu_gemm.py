"""XLA's fp32 dots against jaxtrain.cpu_gemm's OpenBLAS products, on the 35M step's shapes.

    python benchmarks/cpu_gemm.py                 # each product alone, 3 alternating rounds
    python benchmarks/cpu_gemm.py --rounds=5 --runs=21

For each shape the same einsum runs jitted as `jnp.einsum` (XLA:CPU: YNNPACK GEMMs) and as
`jaxtrain.cpu_gemm.einsum` (the FFI custom call: OpenBLAS sgemm, split over XLA's threads). The two
alternate, `--runs` timed calls each per round; a round's number is the median call, and the table
gives the median over rounds, in GFLOP/s, with the ratio. The shapes are those of the 35M config at
batch 8 x 512 (configs/llama.py:35m): the MLP and q/k/v projections and their gradients, and the
batched block products of the CPU attention (blocks of 256 query rows, 64 (batch, kv head) pairs).
Run it with the jaxtrain environment (`env $(python -m jaxtrain.host_malloc) python ...`) to keep
glibc's page faults on fresh outputs out of the numbers, as in the training step.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (name, einsum, a shape, b shape)
SHAPES = (
    ("mlp gate/up", "btd,dg->btg", (8, 512, 512), (512, 2816)),
    ("mlp down", "btf,fd->btd", (8, 512, 1408), (1408, 512)),
    ("mlp gate/up input grad", "btg,dg->btd", (8, 512, 2816), (512, 2816)),
    ("mlp gate/up weight grad", "btd,btg->dg", (8, 512, 512), (8, 512, 2816)),
    ("q/k/v projection", "btd,dk->btk", (8, 512, 512), (512, 1536)),
    ("attention scores", "bkcgh,bksh->bkcgs", (8, 8, 256, 1, 64), (8, 8, 512, 64)),
    ("attention p @ v", "bkcgs,bksh->bkcgh", (8, 8, 256, 1, 512), (8, 8, 512, 64)),
    ("attention dk/dv block", "bkcgh,bkcge->bkhe", (8, 8, 256, 1, 64), (8, 8, 256, 1, 512)),
)


def flops(spec, a_shape, b_shape):
  sizes = {}
  inputs, out = spec.split("->")
  for axes, shape in zip(inputs.split(","), (a_shape, b_shape)):
    sizes.update(zip(axes, shape))
  total = 2
  for axis in set(inputs.replace(",", "")):
    total *= sizes[axis]
  return total


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--runs", type=int, default=11)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxtrain import cpu_gemm  # pylint: disable=import-outside-toplevel

  reason = cpu_gemm.unavailable_reason()
  if reason is not None:
    sys.exit(f"cpu_gemm.py: jaxtrain.cpu_gemm cannot run here: {reason}")

  def median_call(f, a, b):
    times = []
    for _ in range(args.runs):
      start = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, {args.rounds} rounds x {args.runs} runs, "
        "GFLOP/s (median over rounds of the median call)\n")
  print("| product | einsum | XLA | OpenBLAS | OpenBLAS / XLA |")
  print("|---|---|---|---|---|")
  for name, spec, a_shape, b_shape in SHAPES:
    a = jax.random.normal(jax.random.key(0), a_shape, jnp.float32)
    b = jax.random.normal(jax.random.key(1), b_shape, jnp.float32)
    xla = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))
    blas = jax.jit(lambda a, b, spec=spec: cpu_gemm.einsum(spec, a, b))
    err = float(jnp.max(jnp.abs(xla(a, b) - blas(a, b))) / jnp.max(jnp.abs(xla(a, b))))
    if err > 1e-5:
      sys.exit(f"cpu_gemm.py: {name}: results differ by {err:.1e} (relative)")
    rates = {"xla": [], "blas": []}
    for r in range(args.rounds):
      for kind in (("xla", "blas") if r % 2 == 0 else ("blas", "xla")):
        f = xla if kind == "xla" else blas
        rates[kind].append(flops(spec, a_shape, b_shape) / median_call(f, a, b) / 1e9)
    x, o = statistics.median(rates["xla"]), statistics.median(rates["blas"])
    print(f"| {name} | `{spec}` | {x:.0f} | {o:.0f} | {o / x:.2f} |", flush=True)


if __name__ == "__main__":
  main()
