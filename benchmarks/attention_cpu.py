"""Causal attention alone on CPU, forward + backward: jaxtrain's block-causal `cpu` path by block
size, the masked `xla` reference and (if torch is installed) PyTorch's
SDPA.

  python benchmarks/attention_cpu.py                       # 35M shapes: B=8, T=512, 8 heads of 64
  python benchmarks/attention_cpu.py --blocks=128,256 --repeats=21 --no-torch

Each variant computes d/dq, d/dk, d/dv of sum(attention(q, k, v) * do) for one layer's q, k, v;
the JAX ones are jitted and compiled ahead of time and checked against the reference before any
timing. The variants then run alternately `--repeats` times in this one process (so drift in the
machine's speed hits all of them) and the table shows medians and minima. FLOPs are one layer's
attention share of `model.flops_per_token` (6 * heads * head_dim * T per token: the T x T
products of forward and backward over the causal half), so "GFLOP/s" is the useful rate, not
the rate of the work each variant does (the reference computes the full square).
It backs the choice of `attention.CPU_BLOCK` together with the step-level A/B in
docs/benchmarks.md ("What was tried"): alone, 128 and 256 measured within noise of each other.
"""

import argparse
import functools
import os
import statistics
import sys
import time


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[1:]))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--blocks", default="128,256,512", help="comma-separated `cpu` block sizes")
  p.add_argument("--repeats", type=int, default=11)
  p.add_argument("--no-torch", action="store_true", help="leave PyTorch's SDPA out")
  args = p.parse_args(argv)
  try:
    args.blocks = [int(b) for b in args.blocks.split(",")]
  except ValueError:
    p.error(f"--blocks={args.blocks!r}: expected comma-separated integers")
  if min(args.blocks + [args.batch, args.seq, args.heads, args.kv_heads, args.head_dim,
                        args.repeats]) < 1:
    p.error("sizes, --blocks and --repeats must be positive")
  if args.heads % args.kv_heads:
    p.error(f"--heads={args.heads} is not a multiple of --kv-heads={args.kv_heads}")
  return args


def jax_variants(args):
  """name -> (zero-arg function running one fwd + bwd and blocking, max abs gradient error)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxtrain import attention  # pylint: disable=import-outside-toplevel

  B, T, N, K, H = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  keys = jax.random.split(jax.random.key(0), 4)
  q, do = (jax.random.normal(k, (B, T, N, H), jnp.float32) for k in (keys[0], keys[3]))
  k, v = (jax.random.normal(kk, (B, T, K, H), jnp.float32) for kk in keys[1:3])
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = attention.causal_mask(positions, positions)
  impls = {"xla (masked T x T)": lambda q, k, v: attention.xla_attention(q, k, v, mask)}
  for block in args.blocks:
    impls[f"cpu, block {block}"] = functools.partial(attention.blocked_causal_attention,
                                                     block=block)
  compiled = {}
  for name, fn in impls.items():
    grad = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * do), argnums=(0, 1, 2))
    compiled[name] = jax.jit(grad).lower(q, k, v).compile()
  reference = compiled["xla (masked T x T)"](q, k, v)
  out = {}
  for name, c in compiled.items():
    error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(c(q, k, v), reference))
    out[name] = (lambda c=c: jax.block_until_ready(c(q, k, v)), error)
  return out


def torch_variant(args):
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  B, T, N, K, H = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  gen = torch.Generator().manual_seed(0)
  q = torch.randn(B, N, T, H, generator=gen, requires_grad=True)
  k, v = (torch.randn(B, K, T, H, generator=gen, requires_grad=True) for _ in range(2))
  do = torch.randn(B, N, T, H, generator=gen)

  def run():
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != N)
    torch.autograd.grad(out, (q, k, v), do)

  return {f"PyTorch SDPA (torch {torch.__version__}, {torch.get_num_threads()} threads)":
          (run, None)}


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  variants = jax_variants(args)
  if not args.no_torch:
    try:
      variants.update(torch_variant(args))
    except ImportError:
      print("torch is not installed (pip install -e '.[hf]'); timing JAX only", file=sys.stderr)
  for run, _ in variants.values():
    run()  # Warm up: first-call costs (allocations, thread pools) stay out of the table.
  times = {name: [] for name in variants}
  names = list(variants)
  for r in range(args.repeats):
    for i in range(len(names)):
      name = names[(i + r) % len(names)]
      start = time.perf_counter()
      variants[name][0]()
      times[name].append(time.perf_counter() - start)

  B, T, N, H = args.batch, args.seq, args.heads, args.head_dim
  flops = 6 * B * N * T * T * H  # One layer's share of model.flops_per_token: 6*d*T per token.
  print(f"B={B}, T={T}, {N} heads ({args.kv_heads} kv) of {H}, fp32, forward + backward; "
        f"{args.repeats} alternating runs each")
  print("\n| variant | median (ms) | min (ms) | GFLOP/s (causal) | max abs grad error vs xla |")
  print("|---|---|---|---|---|")
  for name in names:
    med = statistics.median(times[name])
    error = variants[name][1]
    print(f"| {name} | {med * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | {flops / med / 1e9:.1f} "
          f"| {'-' if error is None else f'{error:.1e}'} |")


if __name__ == "__main__":
  main()
