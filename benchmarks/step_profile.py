"""Where a training step's time goes: trace one compiled step and sum XLA's ops by kind.

    python benchmarks/step_profile.py                                   # 35M cpu preset, AdamW
    python benchmarks/step_profile.py --config=configs/default.py
    python benchmarks/step_profile.py --set model.attention=xla --top=40

Builds the step exactly as the trainer does (`make_setup` + `make_train_step`, one device, state
donated), runs two warm-up steps, then traces one step with `jax.profiler` (on CPU with XLA's
per-op trace events, `--xla_cpu_enable_xprof_traceme`) and reads the trace back with
`jax.profiler.ProfileData`. It prints

- the wall time of the traced step and the sum of op time over XLA's worker threads (on a 2-core
  machine two ops can run at once, so the sum can exceed the wall time);
- op time by part of the model (MLP, q/k/v/o projections, attention, LM head + loss, scan
  buffers, other element-wise work), matmuls and the rest apart. The part comes from the einsum or
  op name that JAX writes into each HLO op's metadata, so it names model code, not XLA internals;
- how much of the wall time one matmul, two matmuls, only non-matmul ops, or nothing ran;
- the `--top` ops by time with their HLO output shape and source op.

Tracing costs a few percent; use benchmarks/train_step.py for step times. Dots that XLA:CPU
hands to Eigen (ops named `dot.N` or `dot_general.N`, not `ynn_fusion`) run on Eigen's own
thread pool, and the trace may hold only their dispatch: a 12-GFLOP weight-gradient dot showed
as 0.4 ms. Their time then lands in "nothing (waits, dispatch)".
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

# Einsum subscripts and op names (from jaxtrain/model.py, attention.py, trainer.py) -> model part.
PARTS = (
    ("attention", r"bkc|bks|bqk|bkgts|btnh,bsnh|bsnh|attention|softmax"),
    ("mlp", r"btf|df->|,df|fd->|,fd|->btf|mlp_"),
    ("q/k/v/o", r"dnh|nhd|btnh|_proj"),
    ("head + loss", r"bcv|bcd|,dv|dv->|cross_entropy|log_softmax"),
)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[1:]))
  p.add_argument("--config", default="configs/llama.py:35m")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.attention=xla (repeatable)")
  p.add_argument("--optimizer", default="adamw")
  p.add_argument("--top", type=int, default=25, help="how many single ops to list")
  return p.parse_args(argv)


def part_of(op_name, metadata):
  if "broadcast" in op_name:
    return "buffer zero-fill (broadcast)"
  if "dynamic-update-slice" in op_name or "dynamic-slice" in op_name:
    return "layer scan slicing"
  for part, pattern in PARTS:
    if re.search(pattern, metadata):
      return part
  return "other"


def is_matmul(op_name):
  # XLA:CPU runs dots as `dot.N` or inside library fusions (YNNPACK/XNNPACK/oneDNN).
  return op_name.startswith(("dot", "ynn_fusion", "xnn_fusion", "onednn"))


def trace_step(args):
  """Compile the step, trace one run of it; returns (wall seconds, HLO text, trace file)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxtrain import config as config_lib, sharding, trainer  # pylint: disable=import-outside-toplevel

  cfg = config_lib.load_config(args.config, [item.partition("=")[::2] for item in
                                              [f"optimizer.name={args.optimizer}"] + args.set])
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  setup = trainer.make_setup(cfg, mesh)
  state = setup.init(cfg.train.seed)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1))
  batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
           "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}
  with jax.set_mesh(mesh):
    compiled = trainer.make_train_step(setup).lower(state, batch).compile()
  for _ in range(2):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  trace_dir = tempfile.mkdtemp(prefix="jaxtrain_profile_")
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    sys.exit(f"jax.profiler wrote no trace under {trace_dir}")
  return cfg, wall, compiled.as_text(), files[0]


def op_events(trace_file):
  """(start_ns, end_ns, op name) of every XLA op run on a worker thread."""
  import jax  # pylint: disable=import-outside-toplevel
  data = jax.profiler.ProfileData.from_file(trace_file)
  events = []
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for ev in line.events:
        if ev.name.startswith(("ThunkExecutor", "end:", "Threadpool", "Slinky")):
          continue  # Runtime bookkeeping, not ops.
        events.append((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name))
  return events


def concurrency(events):
  """Wall nanoseconds by what was running: {"1 matmul": ns, "2 matmuls": ns, ...}."""
  points = sorted([(s, 1, i) for i, (s, _, _) in enumerate(events)]
                  + [(e, -1, i) for i, (_, e, _) in enumerate(events)], key=lambda p: (p[0], p[1]))
  active, out, last = set(), collections.Counter(), points[0][0] if points else 0
  for t, delta, i in points:
    if t > last:
      mm = sum(1 for j in active if is_matmul(events[j][2]))
      if mm:
        label = f"{min(mm, 2)} matmul{'s' if mm > 1 else ''} (+ other ops)"
      else:
        label = "only non-matmul ops" if active else "nothing (waits, dispatch)"
      out[label] += t - last
    last = t
    (active.add if delta == 1 else active.discard)(i)
  return out


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_enable_xprof_traceme=true").strip()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  path, _, arg = args.config.partition(":")
  if os.path.exists(path):
    args.config = os.path.abspath(path) + (":" + arg if arg else "")
  cfg, wall, hlo, trace_file = trace_step(args)

  info = {}  # HLO op name -> (output shape, metadata op_name)
  for m in re.finditer(r'^\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name="([^"]*)"', hlo, re.M):
    info[m.group(1)] = (m.group(2), m.group(3))
  events = op_events(trace_file)
  by_op, calls, by_part = collections.Counter(), collections.Counter(), collections.Counter()
  for s, e, name in events:
    by_op[name] += e - s
    calls[name] += 1
    kind = "matmul" if is_matmul(name) else "non-matmul"
    by_part[(part_of(name, info.get(name, ("", ""))[1]), kind)] += e - s
  total = sum(by_op.values())

  print(f"config {args.config} {' '.join(args.set)} (optimizer {args.optimizer}), batch "
        f"{cfg.train.batch_size} x {cfg.data.seq_len}; traced step {wall:.2f} s wall, "
        f"{total / 1e9:.2f} s of op time over XLA's threads")
  print("\n| model part | kind | op time (s) | share |\n|---|---|---|---|")
  for (part, kind), ns in by_part.most_common():
    print(f"| {part} | {kind} | {ns / 1e9:.2f} | {100 * ns / total:.0f}% |")
  print("\n| wall time with ... running | s | share |\n|---|---|---|")
  spans = concurrency(events)
  span_total = sum(spans.values()) or 1
  for label, ns in sorted(spans.items()):
    print(f"| {label} | {ns / 1e9:.2f} | {100 * ns / span_total:.0f}% |")
  print("\n| op | calls | time (ms) | output | source op |\n|---|---|---|---|---|")
  for name, ns in by_op.most_common(args.top):
    shape, source = info.get(name, ("?", "?"))
    print(f"| {name} | {calls[name]} | {ns / 1e6:.0f} | {shape} | {source[-70:]} |")


if __name__ == "__main__":
  main()
