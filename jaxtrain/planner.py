"""The planner: XLA's own per-device memory and FLOPs of the real training step, before launch.

`plan(config, devices=N)` compiles exactly the step `jaxtrain train` runs (same setup, shardings,
donation) ahead of time on the config's mesh over N devices, allocating nothing. Where this
machine has fewer than N devices it compiles on N fake CPU devices in a subprocess
(`--xla_force_host_platform_device_count`), so a laptop plans for 8 GPUs.

- Memory: `compiled.memory_analysis()` of the step as configured (scanned layers, loss chunks,
  micro-batches): arguments (the state and a batch), outputs, temporaries; the donated state is
  aliased, so total = arguments + outputs - aliased + temporaries + code.
- FLOPs: XLA's cost analysis counts a loop body once, so the step is compiled twice more with
  its loops unrolled (layers unrolled, the loss in one chunk, one micro-batch, Newton-Schulz
  unrolled) at 1 and 2 layers; every layer is the same, so L layers cost f(1) + (L - 1) (f(2) -
  f(1)), exactly.

Compiled on CPU for a GPU target, the numbers are XLA:CPU's: fusion and scheduling differ on GPUs.
cuDNN attention does not exist there; the block-causal `cpu` attention stands in for it, since it
is flash-style too (its backward keeps q, k, v, the output and the log-sum-exp, never T x T
probabilities, and it skips most of the masked triangle). The masked `xla` attention would hold
every layer's T x T scores without remat and overstate the memory of a cuDNN run many times over.
"""

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import config as config_lib, hardware, model as model_lib, sharding
from jaxtrain.errors import UserError

# The device kinds that `train.hardware` names, for the memory and peak the plan is held against.
HARDWARE_KINDS = {"a40": "NVIDIA A40", "a100": "NVIDIA A100-SXM4-80GB",
                  "h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}
_REPLY = "@@plan "


def _shard_bytes(abstract_tree):
  total = 0
  for x in jax.tree.leaves(abstract_tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def _flops(compiled):
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):  # older jaxlibs: one dict per partition
    costs = costs[0]
  return float(costs.get("flops", 0.0))


def compile_step(config, devices, *, unroll_loops=False):
  """(Setup, compiled train step) on the config's mesh over `devices`; nothing is allocated."""
  from jaxtrain import trainer  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(config.mesh, devices)
  s = trainer.make_setup(config, mesh, unroll_loops=unroll_loops)
  B, T = s.config.train.batch_size, s.config.data.seq_len
  tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=s.batch_sharding)
  batch = {"inputs": tokens, "targets": tokens}
  with jax.set_mesh(mesh):
    compiled = trainer.make_train_step(s).lower(s.abstract_state, batch).compile()
  return s, compiled


def _counting_config(config, n_layers):
  """The config with every loop unrolled, at `n_layers` layers, for XLA's FLOP count."""
  cfg = config_lib.load_config_dict(config.to_dict())
  cfg.model.update(n_layers=n_layers, scan_layers=False)
  cfg.train.update(loss_chunk=cfg.data.seq_len, microbatches=1)
  return cfg


def step_flops_per_device(config, devices):
  """XLA's FLOPs per device of one training step, every loop counted (see the module doc)."""
  L = config.model.n_layers
  f1 = _flops(compile_step(_counting_config(config, 1), devices, unroll_loops=True)[1])
  if L == 1:
    return f1
  f2 = _flops(compile_step(_counting_config(config, 2), devices, unroll_loops=True)[1])
  return f1 + (L - 1) * (f2 - f1)


def _target(config, devices):
  """(device kind the plan is for, where that came from)."""
  name = config.train.hardware
  if name in HARDWARE_KINDS:
    return HARDWARE_KINDS[name], f"train.hardware={name}"
  if devices[0].platform == "gpu":
    return devices[0].device_kind, "this machine's GPU"
  return None, "CPU (train.hardware names no GPU)"


def _memory_fraction():
  """The share of GPU memory XLA preallocates for JAX (its default 0.75, or the user's)."""
  try:
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
  except ValueError:
    return 0.75


def plan_here(config, devices, mfu=0.4, flops=True):
  """The plan on these (real or fake) devices; see `plan`."""
  start = time.perf_counter()
  n = len(devices)
  notes = []
  if devices[0].platform == "cpu" and config.model.attention in ("cudnn", "auto"):
    config = config_lib.load_config_dict(config.to_dict())
    config.model.attention = "cpu"
    notes.append("compiled by XLA:CPU: GPU fusion differs, and the flash-style block-causal "
                 "`cpu` attention stands in for cuDNN's")
  s, compiled = compile_step(config, devices)
  mem = compiled.memory_analysis()
  flops = step_flops_per_device(config, devices) if flops else None
  cfg = s.config
  tokens = cfg.train.batch_size * cfg.data.seq_len
  model_flops = s.flops_per_token * tokens
  kind, kind_source = _target(config, devices)
  info = hardware.device_info(kind) if kind else None
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  device_memory = int(info.memory_gib * 2 ** 30) if info and info.memory_gib else None
  usable = int(device_memory * _memory_fraction()) if device_memory else None
  peak, peak_source = (hardware.table_peak_tflops(kind, cfg.model.dtype) if kind
                       else (None, "no GPU target"))
  return {
      "devices": n,
      "mesh": dict(s.mesh.shape),
      "compiled_on": f"{devices[0].platform} ({devices[0].device_kind})",
      "target": kind, "target_source": kind_source,
      "global_batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
      "tokens_per_step": tokens,
      "params": model_lib.param_counts(s.model_config)["total"],
      "state_bytes_per_device": _shard_bytes(s.abstract_state),
      "argument_bytes_per_device": mem.argument_size_in_bytes,
      "output_bytes_per_device": mem.output_size_in_bytes,
      "alias_bytes_per_device": mem.alias_size_in_bytes,
      "temp_bytes_per_device": mem.temp_size_in_bytes,
      "total_bytes_per_device": total,
      "device_memory_bytes": device_memory,
      "usable_bytes_per_device": usable,
      "usable_fraction": _memory_fraction() if usable else None,
      "fits": (total <= usable) if usable else None,
      "flops_per_device": flops,
      "model_flops_per_step": model_flops,
      "xla_flops_over_model_flops": flops * n / model_flops if flops and model_flops else None,
      "peak_tflops_per_device": peak, "peak_source": peak_source,
      "mfu": mfu,
      "step_seconds_at_mfu": model_flops / (n * peak * 1e12 * mfu) if peak else None,
      "plan_seconds": time.perf_counter() - start,
      "notes": notes,
  }


def plan(config, devices=None, mfu=0.4, flops=True, nodes=1):
  """XLA's per-device memory and FLOPs of the training step on `devices` devices (default: this
  machine's), and whether it fits the target's memory (`train.hardware`, else this GPU).

  Returns a dict with at least: devices, mesh, state_bytes_per_device, temp_bytes_per_device,
  total_bytes_per_device, flops_per_device, model_flops_per_step, device_memory_bytes, fits,
  step_seconds_at_mfu. `flops=False` skips the two compiles that count FLOPs (memory only:
  flops_per_device is None). `nodes` > 1 adds the hybrid mesh's split (`mesh_across_nodes`,
  `mesh_within_node`, from `mesh.dcn_*`); per-device memory and FLOPs depend on the whole mesh
  only. A bad config is a UserError before anything compiles.
  """
  n = jax.device_count() if devices is None else devices
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise UserError(f"--devices must be a positive integer, got {devices!r}")
  if not 0 < mfu <= 1:
    raise UserError(f"--mfu must be in (0, 1], got {mfu!r}")
  config_lib.validate(config_lib.resolve(config, n), n)
  if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 or n % nodes:
    raise UserError(f"--nodes={nodes!r} must be a positive integer dividing --devices={n}")
  split = None
  if nodes > 1:
    shape = sharding.mesh_shape(config.mesh, n)
    split = sharding.dcn_shape(config.mesh, nodes, shape)
  if n <= jax.device_count():
    result = plan_here(config, jax.devices()[:n], mfu, flops)
  else:
    result = _plan_in_subprocess(config, n, mfu, flops)
  result["nodes"] = nodes
  if split is not None:
    result["mesh_across_nodes"] = dict(zip(sharding.MESH_AXES, split[0]))
    result["mesh_within_node"] = dict(zip(sharding.MESH_AXES, split[1]))
  return result


def _plan_in_subprocess(config, n, mfu, flops):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                       f"--xla_force_host_platform_device_count={n}")
  request = json.dumps({"config": config.to_dict(), "devices": n, "mfu": mfu, "flops": flops})
  proc = subprocess.run([sys.executable, "-m", "jaxtrain.planner"], input=request, env=env,
                        capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith(_REPLY):
      return json.loads(line[len(_REPLY):])
  message = (proc.stderr.strip().splitlines() or ["no output"])[-1]
  if proc.returncode == 2:
    raise UserError(message.removeprefix("error: "))
  raise RuntimeError(f"the planner's subprocess on {n} fake CPU devices failed: {message}")


def format_plan(p):
  """The plan as lines a person reads."""
  gib = lambda b: "-" if b is None else f"{b / 2 ** 30:.2f} GiB"
  flops = ("not counted (flops=False)" if p["flops_per_device"] is None else
           f"{p['flops_per_device'] / 1e12:.2f} TFLOP per device per step (XLA), model "
           f"{p['model_flops_per_step'] / 1e12:.2f} TFLOP per step; XLA / model "
           f"{p['xla_flops_over_model_flops']:.2f} (remat recompute, attention past the causal "
           "half, optimizer)")
  lines = [
      f"plan: {p['devices']} devices, mesh {p['mesh']}, compiled on {p['compiled_on']}; target "
      f"{p['target'] or 'none'} ({p['target_source']})",
      f"batch: {p['global_batch']} x {p['seq_len']} = {p['tokens_per_step']:,} tokens/step, "
      f"{p['params'] / 1e9:.3f}B params",
      f"per device: state {gib(p['state_bytes_per_device'])}, temporaries "
      f"{gib(p['temp_bytes_per_device'])}, total {gib(p['total_bytes_per_device'])} of "
      f"{gib(p['usable_bytes_per_device'])} usable"
      + (f" ({p['usable_fraction']:.0%} of {gib(p['device_memory_bytes'])})"
         if p["usable_fraction"] else "")
      + {True: ": fits", False: ": DOES NOT FIT", None: ""}[p["fits"]],
      f"FLOPs: {flops}",
  ]
  if p.get("mesh_across_nodes"):
    lines.insert(1, f"hybrid mesh on {p['nodes']} nodes: across nodes {p['mesh_across_nodes']}, "
                    f"within a node {p['mesh_within_node']} (docs/scaling.md)")
  if p["step_seconds_at_mfu"]:
    lines.append(f"step time at MFU {p['mfu']:.0%}: {p['step_seconds_at_mfu']:.3f} s "
                 f"(peak {p['peak_tflops_per_device']:.4g} TFLOP/s, {p['peak_source']})")
  lines += [f"note: {n}" for n in p["notes"]]
  lines.append(f"planned in {p['plan_seconds']:.0f} s")
  return "\n".join(lines)


def _main():
  request = json.loads(sys.stdin.read())
  config = config_lib.load_config_dict(request["config"])
  try:
    result = plan_here(config, jax.devices()[:request["devices"]], request["mfu"],
                       request["flops"])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(_REPLY + json.dumps(result))


if __name__ == "__main__":
  _main()
