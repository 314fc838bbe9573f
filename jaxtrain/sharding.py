"""Mesh from config, and one small table from logical axis names to mesh axes.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism whose
parameters and optimizer state are sharded too) and `tensor` (heads and MLP width split across
devices). XLA's GSPMD inserts the collectives; we only say where each array lives.
"""

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
# How much of each mesh axis crosses nodes (the slow network, DCN) in a multi-node job:
# `mesh.dcn_data` etc., see `dcn_shape` and jaxtrain/distributed.py.
DCN_KEYS = tuple(f"dcn_{a}" for a in MESH_AXES)

# Logical axis -> mesh axis (or None: replicated). Batch rows are split over both data axes.
RULES = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}

# Activations: rows over the batch axes, model width replicated (never `fsdp`: that axis splits
# the weights' embed dim, and GSPMD would follow it into the activations and repeat work).
ACTIVATION_RULES = {**RULES, "embed": None, "seq": None}


def mesh_shape(mesh_cfg, num_devices):
  """Resolve -1 (the rest of the devices) and check the product; errors name `mesh.*`."""
  sizes = {}
  for name in MESH_AXES:
    value = mesh_cfg.get(name, 1)
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
      raise UserError(f"mesh.{name} must be a positive integer or -1, got {value!r}")
    sizes[name] = value
  unknown = [k for k in mesh_cfg.keys() if k not in MESH_AXES + DCN_KEYS]
  if unknown:
    raise UserError(f"mesh.{unknown[0]} is not a mesh axis (known: {', '.join(MESH_AXES)})")
  rest = [n for n, v in sizes.items() if v == -1]
  if len(rest) > 1:
    raise UserError(f"only one mesh axis may be -1, got {', '.join('mesh.' + n for n in rest)}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if rest:
    if num_devices % fixed:
      raise UserError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product "
                      f"{fixed}")
    sizes[rest[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    shape = " x ".join(f"mesh.{n}={v}" for n, v in sizes.items())
    raise UserError(f"{shape} needs {math.prod(sizes.values())} devices, "
                    f"but {num_devices} are available")
  return tuple(sizes[n] for n in MESH_AXES)


def dcn_shape(mesh_cfg, num_nodes, shape=None):
  """The across-node part of each axis (`mesh.dcn_*`, -1: the nodes the others leave).

  With `shape` (the whole mesh), also the within-node part: (dcn, ici) with dcn * ici == shape
  axis by axis. `num_nodes=None` checks the values only."""
  dcn = []
  for key in DCN_KEYS:
    value = mesh_cfg.get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
      raise UserError(f"mesh.{key} must be a positive integer or -1, got {value!r}")
    dcn.append(value)
  if dcn.count(-1) > 1:
    raise UserError("only one of mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor may be -1")
  if num_nodes is None:
    return None
  fixed = math.prod(v for v in dcn if v != -1)
  if -1 in dcn:
    if num_nodes % fixed:
      raise UserError(f"mesh: {num_nodes} nodes are not divisible by the fixed mesh.dcn_* "
                      f"product {fixed}")
    dcn[dcn.index(-1)] = num_nodes // fixed
  if math.prod(dcn) != num_nodes:
    raise UserError(f"mesh.dcn_* = {tuple(dcn)} needs {math.prod(dcn)} nodes, the job has "
                    f"{num_nodes}")
  if shape is None:
    return tuple(dcn)
  for axis, total, d in zip(MESH_AXES, shape, dcn):
    if total % d:
      hint = (f"; for data parallelism across the {d} nodes set mesh.data={d} (the GPU presets "
              "set mesh.data=1: FSDP over one node's devices)" if axis == "data" else "")
      raise UserError(f"mesh.{axis}={total} is not divisible by mesh.dcn_{axis}={d} (the part "
                      f"of the axis that crosses nodes){hint}")
  return tuple(dcn), tuple(t // d for t, d in zip(shape, dcn))


def make_mesh(mesh_cfg, devices=None):
  """Mesh over all devices (jax.make_mesh picks a good device order) or the given ones."""
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices is None:
    shape = mesh_shape(mesh_cfg, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(axes, shape, mesh, rules=RULES):
  """PartitionSpec for one array. A dim whose size the mesh axis does not divide is replicated;
  two logical axes mapped to the same mesh axis are rejected (that would be a silent bug)."""
  spec, used = [], set()
  for name, size in zip(axes, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule")
    target = rules[name]
    targets = () if target is None else (target if isinstance(target, tuple) else (target,))
    for t in targets:
      if t in used:
        raise ValueError(f"logical axes {axes} map mesh axis {t!r} twice")
      used.add(t)
    n = math.prod(mesh.shape[t] for t in targets)
    if not targets or n == 1 or size % n:
      spec.append(None)
    else:
      spec.append(targets[0] if len(targets) == 1 else targets)
  return P(*spec)


def constrain(x, axes):
  """Pin an activation to the mesh in context (`jax.set_mesh`) by logical axis names.

  Without a mesh, or on one device, it does nothing, so model code can call it everywhere. These
  constraints keep the batch split over (data, fsdp) at block boundaries, in the layer scan, the
  loss chunks and the gradient accumulator; without them GSPMD follows the fsdp-sharded weights
  into the activations and every device repeats most of the work (tests/test_sharding.py).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_spec(axes, x.shape, mesh, ACTIVATION_RULES))


def batch_axes_size(mesh=None):
  """Devices the batch is split over (data x fsdp) on `mesh` or the mesh in context; 1 without."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    return 1
  return math.prod(mesh.shape.get(a, 1) for a in RULES["batch"])


def param_shardings(axes_tree, abstract_params, mesh):
  """NamedShardings for a params pure-dict, from the model's logical axes."""
  def one(axes, x):
    return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh))
  return jax.tree.map(one, axes_tree, abstract_params, is_leaf=lambda a: isinstance(a, tuple))


def batch_sharding(mesh):
  """Rows over (data, fsdp), sequence replicated."""
  return NamedSharding(mesh, P(RULES["batch"]))


def replicated(mesh):
  return NamedSharding(mesh, P())


def data_parallel_size(mesh):
  return batch_axes_size(mesh)
