"""Gram Newton-Schulz against standard Newton-Schulz: FLOPs (XLA's count) and time, same run.

  python -m benchmarks.gram_ns                          # CPU: MLP kernels of 35M and 125M
  python -m benchmarks.gram_ns --shapes=4x768x2048,4x1024x2816 --repeats=20   # e.g. on a GPU

Each shape BxMxN is a stack of B matrices orthogonalised by `optim.orthogonalize` (5 steps,
Jordan's coefficients, fp32), once with method='standard' and once with method='gram' (restart
after step 2). Both are jitted and compiled first; then they run alternately `repeats` times and
the table shows medians, so drift in a shared machine's speed hits both. FLOPs are XLA's
cost_analysis of the unrolled loop (a scan body is counted once otherwise) next to
`optim.ns_flops`; "max |diff|" is the largest elementwise difference of the two results.
"""

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import optim

# 35M: (512, 1408) and 125M: (768, 2048) MLP kernels, and a square attention matrix.
DEFAULT_SHAPES = "2x512x1408,1x768x2048,2x512x512"


def measure(shape, repeats):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  fns, flops, outs = {}, {}, {}
  for method in optim.NS_METHODS:
    ortho = lambda x, m=method: optim.orthogonalize(x, "standard", 5, method=m)
    fns[method] = jax.jit(ortho).lower(x).compile()
    unrolled = lambda x, m=method: optim.orthogonalize(x, "standard", 5, method=m, unroll=True)
    flops[method] = jax.jit(unrolled).lower(x).compile().cost_analysis()["flops"]
    outs[method] = fns[method](x).block_until_ready()
  times = {m: [] for m in fns}
  for _ in range(repeats):
    for m, fn in fns.items():
      t = time.perf_counter()
      fn(x).block_until_ready()
      times[m].append(time.perf_counter() - t)
  med = {m: float(np.median(v)) for m, v in times.items()}
  b, m_, n = shape
  return {
      "shape": "x".join(map(str, shape)),
      "uses_gram": optim.uses_gram(m_, n, 5),
      "xla_flops": flops, "predicted_flops": {
          k: b * optim.ns_flops(m_, n, 5, k) for k in optim.NS_METHODS},
      "median_s": med,
      "max_abs_diff": float(jnp.max(jnp.abs(outs["gram"] - outs["standard"]))),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
  print(f"{datetime.date.today()} {platform.node()} jax {jax.__version__} "
        f"{jax.devices()[0].device_kind}, {args.repeats} repeats, medians")
  print()
  print("| stack | Gram used | XLA FLOPs std | XLA FLOPs gram | ratio (predicted) | time std | "
        "time gram | time ratio | max abs diff |")
  print("|---|---|---|---|---|---|---|---|---|")
  for shape in shapes:
    r = measure(shape, args.repeats)
    f, p, t = r["xla_flops"], r["predicted_flops"], r["median_s"]
    print(f"| {r['shape']} | {'yes' if r['uses_gram'] else 'no (square)'} | "
          f"{f['standard']:.3g} | {f['gram']:.3g} | {f['gram'] / f['standard']:.2f} "
          f"({p['gram'] / p['standard']:.2f}) | {t['standard'] * 1e3:.1f} ms | "
          f"{t['gram'] * 1e3:.1f} ms | {t['gram'] / t['standard']:.2f} | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
  main()
