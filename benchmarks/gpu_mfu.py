"""MFU of the training step on a GPU (or any device): the LLaMA sizes of configs/llama.py.

    python benchmarks/gpu_mfu.py                              # 125m, 350m, 1.4b, AdamW
    python benchmarks/gpu_mfu.py --sizes=125m --optimizers=adamw,muon
    python benchmarks/gpu_mfu.py --sizes=1.4b --set train.batch_size_per_device=16 --set model.remat=none
    python benchmarks/gpu_mfu.py --sizes=toy --hardware=cpu --steps=2 --rounds=2 \\
        --set data.seq_len=64 --set train.batch_size_per_device=2        # a dry run on CPU
    bash benchmarks/gpu_run.sh                                # the prepared run for a lent GPU

Each (size, optimizer) runs in a fresh process, so each starts with the device's memory empty and
one that fails (out of memory, say) does not stop the others. The process loads
`configs/llama.py:SIZE,HARDWARE` (HARDWARE from the device kind unless `--hardware` names it: bf16
compute, fp32 master weights, cuDNN attention, the preset's batch of 2048-token sequences), applies
the `--set` overrides, and builds exactly the step `jaxtrain train` runs (make_setup +
make_train_step: the config's mesh over every device, the state donated), compiled ahead of time
for a random batch of the config's shape. After two warm-up steps it times `--rounds` rounds of
`--steps` steps back to back, as the training loop dispatches them, each round to its last step's
end; the table gives the median round's time per step.

MFU is the model FLOP/s per device (jaxtrain.model.flops_per_token, 6N plus attention, the same
count the training loop's metrics use) over the dense peak of jaxtrain.hardware for the device
and compute dtype (989.4 TFLOP/s bf16 for H100 and H200): the number `jaxtrain train` logs as `mfu`,
without the data loader. Peak device memory is XLA's `peak_bytes_in_use` (GPUs only).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

PROTOCOL = "@@ "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARDWARE = ("cpu", "a40", "a100", "h100", "h200")


def hardware_of(device):
  """The configs/llama.py preset for a jax device, from its kind (e.g. 'NVIDIA H200' -> h200)."""
  if device.platform == "cpu":
    return "cpu"
  kind = device.device_kind.lower()
  for name in ("h200", "h100", "a100", "a40"):
    if name in kind:
      return name
  return None


def config_spec(args, size, hardware):
  return f"{args.config}:{size},{hardware}"


def overrides_of(args, optimizer):
  return [("optimizer.name", optimizer)] + [tuple(s.split("=", 1)) for s in args.set]


def measure(spec):
  """One (size, optimizer) in this process: compile, warm up, time; returns the result dict."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxtrain import config as config_lib, hardware, metrics, model as model_lib, trainer  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  hw = spec["hardware"] or hardware_of(device)
  if hw is None:
    return {"error": f"no configs/llama.py preset for device kind {device.device_kind!r}; "
                     f"pass --hardware ({', '.join(HARDWARE)})"}
  cfg = config_lib.load_config(f"{spec['config']}:{spec['size']},{hw}", spec["overrides"])
  setup = trainer.make_setup(cfg)
  cfg = setup.config  # train.batch_size resolved from train.batch_size_per_device
  state = setup.init(cfg.train.seed)
  step = trainer.make_train_step(setup)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, setup.model_config.vocab_size, (B // jax.process_count(), T + 1),
                        dtype=np.int32)
  batch = trainer.to_global({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                            setup.batch_sharding)
  with jax.set_mesh(setup.mesh):
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    state, m = compiled(state, batch)
    first_loss = float(m["loss"])
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    per_step = []
    for _ in range(spec["rounds"]):
      start = time.perf_counter()
      for _ in range(spec["steps"]):
        state, m = compiled(state, batch)
      jax.block_until_ready((state, m))
      per_step.append((time.perf_counter() - start) / spec["steps"])
    last_loss = float(m["loss"])
  peak, peak_source = hardware.device_peak_tflops(cfg.model.dtype, device)
  seconds = statistics.median(per_step)
  rates = metrics.Throughput(setup.flops_per_token, jax.device_count(), peak)(B * T, seconds)
  stats = device.memory_stats() or {}
  c = setup.model_config
  return {
      "size": spec["size"], "hardware": hw, "optimizer": cfg.optimizer.name,
      "device_kind": device.device_kind, "devices": jax.device_count(), "jax": jax.__version__,
      "params": model_lib.param_counts(c)["total"], "n_layers": c.n_layers,
      "d_model": c.d_model, "dtype": cfg.model.dtype, "remat": cfg.model.remat,
      "attention": cfg.model.attention, "batch_size": B, "seq_len": T,
      "mesh": dict(setup.mesh.shape), "flops_per_token": setup.flops_per_token,
      "compile_seconds": compile_seconds, "step_seconds": per_step, "median_step_seconds": seconds,
      **rates, "peak_tflops": peak, "peak_source": peak_source,
      "peak_memory_gib": stats["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in stats
                         else None,
      "first_loss": first_loss, "last_loss": last_loss}


def run_child(spec, timeout):
  """Runs `measure` in a fresh process; a failure comes back as {"error": its last line}."""
  try:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in out.stdout.splitlines():
    if line.startswith(PROTOCOL):
      return json.loads(line[len(PROTOCOL):])
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  sys.stderr.write(out.stderr[-4000:])
  return {"error": f"exit {out.returncode}: " + (lines[-1][:300] if lines else "no output")}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--config", default="configs/llama.py", help="a config taking SIZE,HARDWARE")
  parser.add_argument("--sizes", default="125m,350m,1.4b", help="comma-separated")
  parser.add_argument("--optimizers", default="adamw", help="comma-separated: adamw, muon")
  parser.add_argument("--hardware", default="", choices=("",) + HARDWARE,
                      help="the config preset; default: from the device kind")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set train.batch_size_per_device=16 (repeatable)")
  parser.add_argument("--timeout", type=float, default=300, help="seconds per (size, optimizer)")
  parser.add_argument("--json", default="", help="also append one JSON line per result here")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.rounds < 1:
    parser.error(f"--steps and --rounds must be >= 1, got {args.steps} and {args.rounds}")
  if any("=" not in s for s in args.set):
    parser.error(f"--set takes KEY=VALUE, got {[s for s in args.set if '=' not in s]}")
  path = args.config
  args.config = os.path.abspath(path) if os.path.exists(path) else path
  return args


def check_configs(args, sizes, optimizers):
  """Loads every config the run will use, so a bad size or override fails here, in one line,
  before any process touches a device (the preset is a stand-in when the device decides it)."""
  from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
  for size in sizes:
    for optimizer in optimizers:
      config_lib.load_config(config_spec(args, size, args.hardware or "h100"),
                             overrides_of(args, optimizer))


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def table(results):
  lines = ["| size | optimizer | params | batch x seq | dtype, remat, attention | compile (s) | "
           "step (s): median (min - max) | tokens/s | TFLOP/s per device | MFU | "
           "peak memory (GiB) | loss: first -> last |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['size']} | {r['optimizer']} | failed: {r['error']} |" + " |" * 9)
      continue
    steps = r["step_seconds"]
    lines.append(
        f"| {r['size']} | {r['optimizer']} | {r['params'] / 1e9:.3f} B | "
        f"{r['batch_size']} x {r['seq_len']} | {r['dtype']}, {r['remat']}, {r['attention']} | "
        f"{r['compile_seconds']:.1f} | {r['median_step_seconds']:.4f} ({min(steps):.4f} - "
        f"{max(steps):.4f}) | {r['tokens_per_sec']:,.0f} | {r['tflops_per_device']:.4g} | "
        f"{_fmt(r['mfu'], '.1%')} | {_fmt(r['peak_memory_gib'], '.1f')} | "
        f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
  return lines


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  sys.path.insert(0, ROOT)
  if args.child:
    from jaxtrain.errors import UserError  # pylint: disable=import-outside-toplevel
    try:
      result = measure(json.loads(args.child))
    except UserError as e:
      result = {"error": str(e)}
    sys.stdout.write(PROTOCOL + json.dumps(result) + "\n")
    return 0
  from jaxtrain.errors import UserError  # pylint: disable=import-outside-toplevel
  sizes = [s for s in args.sizes.split(",") if s]
  optimizers = [o for o in args.optimizers.split(",") if o]
  try:
    check_configs(args, sizes, optimizers)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results = []
  for optimizer in optimizers:
    for size in sizes:
      spec = {"config": args.config, "size": size, "hardware": args.hardware,
              "overrides": overrides_of(args, optimizer), "steps": args.steps,
              "rounds": args.rounds}
      result = {"size": size, "optimizer": optimizer, **run_child(spec, args.timeout)}
      results.append(result)
      print(f"  {size} {optimizer}: " + (result["error"] if "error" in result else
            f"{result['median_step_seconds']:.4f} s/step, MFU {_fmt(result['mfu'], '.1%')}"),
            file=sys.stderr, flush=True)
      if args.json:
        with open(args.json, "a") as f:
          f.write(json.dumps({"date": str(datetime.date.today()), **result}) + "\n")
  done = [r for r in results if "error" not in r]
  if done:
    r = done[0]
    print(f"date {datetime.date.today()}, {r['devices']} x {r['device_kind']}, jax {r['jax']}, "
          f"peak {_fmt(r['peak_tflops'], '.4g')} TFLOP/s per device ({r['peak_source']})")
  print(f"{args.rounds} rounds of {args.steps} steps after 2 warm-up steps, random tokens; "
        f"command: python benchmarks/gpu_mfu.py {' '.join(sys.argv[1:] if argv is None else argv)}"
        .rstrip())
  print()
  print("\n".join(table(results)))
  return 1 if len(done) < len(results) else 0


if __name__ == "__main__":
  sys.exit(main())
