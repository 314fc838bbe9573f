"""Optimizer update time: jaxtrain Muon vs optax.contrib.muon doing the same math.

  python -m benchmarks.muon_update                       # 35M and 350M, prints a markdown table
  python -m benchmarks.muon_update --sizes=35m --repeats=5

Both optimizers get the same parameter tree (LLaMA layout, layers stacked on axis 0), the same
routing (hidden matrices to Muon, given to optax as MuonDimensionNumbers so it treats L as a batch
axis and wq/wo as (D, N*H)/(N*H, D) matrices), Keller Jordan's coefficients, 5 NS steps in fp32,
beta 0.95 Nesterov, RMS-matched shape scaling (0.2), and AdamW (0.9, 0.95) on the rest; ours runs
with its defaults (on CPU one NS loop per leaf, like optax's per-leaf vmap). Remaining
differences, none of which change the cost by more than a few elementwise passes: optax
bias-corrects the momentum (ours does not: NS divides by the norm anyway), and optax's AdamW group
decays norm scales (ours masks them).

Each update is jitted and compiled ahead of time; then ours and optax's run alternately `repeats`
times in this one process and the table shows medians, so drift in the machine's speed hits both.
Next to wall-clock seconds it shows the CPU seconds the process burnt: on a shared machine other
processes stretch wall time far more than CPU time. NS FLOPs count the three matmuls of each step
(X X^T, A A, B X) of every hidden matrix; achieved FLOP/s = NS FLOPs / our whole update time (so
it understates the NS loop alone), compared with the best of large jitted fp32 matmuls timed in the
same process before and after each size (the "measured peak", also per CPU-second; XLA's dot and,
where our NS runs its products through OpenBLAS, that product too).
"""

import argparse
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

from jaxtrain import optim
from jaxtrain.optim import routing

SIZES = {
    # name: (D, L, N, K, H, F, V); K = N (no GQA) where the brief gives no kv-head count.
    '35m': (512, 8, 8, 8, 64, 1408, 8192),
    '350m': (1024, 24, 16, 16, 64, 2816, 32000),
}
COEFFS = (3.4445, -4.7750, 2.0315)


def param_shapes(D, L, N, K, H, F, V):
  return {
      'embed': {'embedding': (V, D)},
      'blocks': {
          'attn_norm': {'scale': (L, D)},
          'mlp_norm': {'scale': (L, D)},
          'attn': {'wq': (L, D, N, H), 'wk': (L, D, K, H), 'wv': (L, D, K, H), 'wo': (L, N, H, D)},
          'mlp': {'w_gate': (L, D, F), 'w_up': (L, D, F), 'w_down': (L, F, D)},
      },
      'final_norm': {'scale': (D,)},
      'lm_head': {'kernel': (D, V)},
  }


def optax_dim_numbers(params):
  """Our routing expressed as optax MuonDimensionNumbers (None = AdamW)."""

  def dim_numbers(path, _):
    layout = routing.hidden_layout(path, routing.DEFAULT_HIDDEN)
    if layout is None:
      return None
    axes = lambda c: tuple(k for k, a in enumerate(layout) if a == c)
    return MuonDimensionNumbers(reduction_axis=axes('i'), output_axis=axes('o'))

  return routing.map_with_path(dim_numbers, params)


def make_optimizers(lr=3e-4, wd=0.1, ns_steps=5):
  ours = optim.muon(lr, weight_decay=wd, ns_coeffs='standard', ns_steps=ns_steps,
                    shape_scaling='rms_match', rms_scale=0.2)
  theirs = optax.contrib.muon(
      lr, ns_coeffs=COEFFS, ns_steps=ns_steps, beta=0.95, eps=1e-7, weight_decay=wd, nesterov=True,
      adam_b1=0.9, adam_b2=0.95, adam_weight_decay=wd,
      muon_weight_dimension_numbers=optax_dim_numbers, consistent_rms=0.2)
  return {'jaxtrain': ours, 'optax.contrib': theirs}


def compiled_update(opt, params, grads):
  state = opt.init(params)
  fn = jax.jit(opt.update).lower(grads, state, params).compile()
  return lambda: jax.block_until_ready(fn(grads, state, params))


def timed(fn):
  """(wall seconds, CPU seconds of this process): on a shared machine other processes stretch
  the wall time of a run, much less the CPU time it burns."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def cpu_name():
  try:
    with open('/proc/cpuinfo') as f:
      name = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    name = platform.processor() or platform.machine()
  return f'{name}, {os.cpu_count()} cores'


def matmul_peak(sizes=(2048, 3072), repeats=5):
  """Best median (FLOP per wall second, FLOP per CPU second) of large square fp32 matmuls."""
  products = [jnp.matmul]
  best = np.zeros(2)
  rng = np.random.default_rng(1)
  for n in sizes:
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32)) for _ in range(2))
    for product in products:
      f = jax.jit(product).lower(a, b).compile()
      jax.block_until_ready(f(a, b))
      t = np.median([timed(lambda: jax.block_until_ready(f(a, b))) for _ in range(repeats)],
                    axis=0)
      best = np.maximum(best, 2 * n**3 / t)
  return best


def ns_flops_of(shapes):
  total = 0
  is_shape = lambda x: isinstance(x, tuple)
  for kp, shape in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]:
    path = routing.path_str(kp)
    layout = routing.hidden_layout(path, routing.DEFAULT_HIDDEN)
    if layout is not None:
      fan_in, fan_out = routing.fans(shape, layout)
      batch = int(np.prod([d for d, a in zip(shape, layout) if a == 'b']))
      total += batch * optim.ns_flops(fan_in, fan_out, 5)
  return total


def bench(size, repeats):
  shapes = param_shapes(*SIZES[size])
  is_shape = lambda x: isinstance(x, tuple)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  rng = np.random.default_rng(0)  # numpy: generating 0.7G normals with threefry takes minutes
  normal = lambda s, scale: jnp.asarray(scale * rng.standard_normal(s, np.float32))
  params = jax.tree.unflatten(treedef, [normal(s, 0.02) for s in leaves])
  grads = jax.tree.unflatten(treedef, [normal(s, 1.0) for s in leaves])
  n_params = sum(int(np.prod(s)) for s in leaves)
  runs = {name: compiled_update(opt, params, grads) for name, opt in make_optimizers().items()}
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      times[name].append(timed(run))
  medians = {name: np.median(t, axis=0) for name, t in times.items()}  # (wall, cpu)
  return n_params, medians, ns_flops_of(shapes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='35m,350m')
  parser.add_argument('--repeats', type=int, default=5, help='alternating runs for 35m')
  parser.add_argument('--repeats_large', type=int, default=1,
                      help='alternating runs for 350m (~75 s per update on 2 CPU cores)')
  args = parser.parse_args()

  load_before = os.getloadavg()[0]
  # The peak is measured before and after every size and the best kept: other processes on a
  # shared machine can only make a measurement slower.
  peaks = [matmul_peak()]
  results = []
  for size in args.sizes.split(','):
    repeats = args.repeats if size == '35m' else args.repeats_large
    results.append((size, repeats, *bench(size, repeats)))
    peaks.append(matmul_peak())
  peak = np.max(peaks, axis=0)
  rows = []
  for size, repeats, n_params, t, flops in results:
    ours, theirs = t['jaxtrain'], t['optax.contrib']
    speed_up = theirs / ours
    rows.append(f'| {size} ({n_params / 1e6:.0f}M) | {repeats} | {ours[0]:.2f} ({ours[1]:.2f}) | '
                f'{theirs[0]:.2f} ({theirs[1]:.2f}) | {speed_up[0]:.2f}x ({speed_up[1]:.2f}x) | '
                f'{flops / 1e12:.2f} | {flops / ours[0] / 1e9:.0f} | '
                f'{flops / ours[0] / peak[0]:.0%} ({flops / ours[1] / peak[1]:.0%}) |')
  print(f'{datetime.date.today()} · {cpu_name()} · '
        f'{jax.device_count()}x {jax.devices()[0].device_kind} · jax {jax.__version__} · '
        f'optax {optax.__version__} · measured fp32 matmul peak {peak[0] / 1e9:.0f} GFLOP/s '
        f'(best of {", ".join(f"{p[0] / 1e9:.0f}" for p in peaks)}; per CPU-second '
        f'{peak[1] / 1e9:.0f}) · load average {load_before:.1f} before, '
        f'{os.getloadavg()[0]:.1f} after\n')
  print('Wall-clock seconds per update, median (CPU seconds of the process in parentheses).\n')
  print('| params | runs | jaxtrain s | optax.contrib s | speed-up | NS TFLOP/update | '
        'NS GFLOP/s | of peak (per CPU-s) |')
  print('|---|---|---|---|---|---|---|---|')
  print('\n'.join(rows))

if __name__ == '__main__':
  main()
