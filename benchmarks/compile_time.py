"""Ahead-of-time compile time of the training step, and how it grows with depth (layer scan).

    python benchmarks/compile_time.py                                  # 1.4B: 24 layers vs 2
    python benchmarks/compile_time.py --config=configs/llama.py:350m --layers=2,24
    python benchmarks/compile_time.py --batch-size=8 --seq-len=2048 --repeats=1

The step is lowered and compiled from abstract values only: `make_setup(cfg).abstract_state`
(ShapeDtypeStructs that carry the target shardings) and a ShapeDtypeStruct batch, through
`make_train_step(setup).lower(state, batch).compile()`. Nothing of the model is allocated (the
1.4B fp32 params + AdamW state alone would need 22 GB), so this runs on any laptop and shows that
the step compiles before a single device byte is spent. Each compile runs in a fresh process
(no in-memory compile cache), alternating between depths; the table shows medians. With layers
under `jax.lax.scan` the HLO holds one layer body whatever the depth, so the 24-layer step should
compile in about the time of the 2-layer one (the target is at most 1.5x).
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROTOCOL = "@@ "


def compile_once(spec):
  """Lower and compile the step from abstract values; returns timings and XLA's memory plan."""
  start = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxtrain import config as config_lib, sharding, trainer  # pylint: disable=import-outside-toplevel
  import_seconds = time.perf_counter() - start

  cfg = config_lib.load_config(spec["config"], spec["overrides"])
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  start = time.perf_counter()
  setup = trainer.make_setup(cfg, mesh)
  step = trainer.make_train_step(setup)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=setup.batch_sharding)
  batch = {"inputs": tokens, "targets": tokens}
  with jax.set_mesh(mesh):
    lowered = step.lower(setup.abstract_state, batch)
  lower_seconds = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  plan = {}
  if memory is not None:
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "alias_size_in_bytes"):
      plan[name] = getattr(memory, name, None)
  params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  return {"import_seconds": import_seconds, "lower_seconds": lower_seconds,
          "compile_seconds": compile_seconds, "plan": plan, "params": int(params),
          "hlo_lines": len(lowered.as_text().splitlines()),
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "jax": jax.__version__, "n_layers": cfg.model.n_layers, "batch": [B, T],
          "scan_layers": cfg.model.scan_layers, "dtype": cfg.model.dtype,
          "attention": cfg.model.attention, "optimizer": cfg.optimizer.name}


def run_child(spec):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], cwd=root,
      capture_output=True, text=True, check=False)
  for line in out.stdout.splitlines():
    if line.startswith(PROTOCOL):
      return json.loads(line[len(PROTOCOL):])
  raise RuntimeError(f"compile failed for {spec}:\n{out.stderr[-3000:]}")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--config", default="configs/llama.py:1.4b")
  parser.add_argument("--layers", default="2,24", help="depths to compile, comma-separated")
  parser.add_argument("--batch-size", type=int, default=1,
                      help="sequences per batch (small: the step is compiled, never run)")
  parser.add_argument("--seq-len", type=int, default=0, help="0: the config's data.seq_len")
  parser.add_argument("--optimizer", default="adamw", help="adamw or muon")
  parser.add_argument("--repeats", type=int, default=3, help="fresh-process compiles per depth")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="extra config override (repeatable)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  if args.child:
    result = compile_once(json.loads(args.child))
    sys.stdout.write(PROTOCOL + json.dumps(result) + "\n")
    return
  path, _, arg = args.config.partition(":")
  config = (os.path.abspath(path) if os.path.exists(path) else path) + (":" + arg if arg else "")
  overrides = [("train.batch_size", str(args.batch_size)), ("optimizer.name", args.optimizer),
               ("mesh.data", "1")]
  if args.seq_len:
    overrides.append(("data.seq_len", str(args.seq_len)))
  overrides += [tuple(s.split("=", 1)) for s in args.set]
  depths = [int(n) for n in args.layers.split(",")]
  results = {n: [] for n in depths}
  for r in range(args.repeats):
    for i in range(len(depths)):
      n = depths[(i + r) % len(depths)]
      spec = {"config": config, "overrides": overrides + [("model.n_layers", str(n))]}
      results[n].append(run_child(spec))
      print(f"  {n} layers: compile {results[n][-1]['compile_seconds']:.1f}s", file=sys.stderr)

  def med(n, key):
    return statistics.median(r[key] for r in results[n])

  first = results[depths[0]][0]
  print(f"date {datetime.date.today()}, jax {first['jax']}, {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.2f} at the end")
  print(f"config {args.config}: batch {first['batch'][0]} x {first['batch'][1]}, "
        f"dtype {first['dtype']}, attention {first['attention']}, optimizer {first['optimizer']}, "
        f"scan_layers {first['scan_layers']}; {args.repeats} fresh-process compiles per depth "
        f"(medians)")
  print(f"command: python benchmarks/compile_time.py {' '.join(sys.argv[1:])}".rstrip())
  print()
  print("| layers | params | lower (s) | compile (s) | compile / first | HLO lines | "
        "XLA plan: args + temp (GiB) | compiler process peak RSS (MiB) |")
  print("|---|---|---|---|---|---|---|---|")
  base = med(depths[0], "compile_seconds")
  for n in depths:
    plan = results[n][0]["plan"]
    gib = ((plan.get("argument_size_in_bytes") or 0) + (plan.get("temp_size_in_bytes") or 0)) / 2 ** 30
    print(f"| {n} | {results[n][0]['params'] / 1e9:.3f} B | {med(n, 'lower_seconds'):.1f} | "
          f"{med(n, 'compile_seconds'):.1f} | {med(n, 'compile_seconds') / base:.2f} | "
          f"{results[n][0]['hlo_lines']:,} | {gib:.1f} | {med(n, 'peak_rss_mib'):,.0f} |")


if __name__ == "__main__":
  main()
