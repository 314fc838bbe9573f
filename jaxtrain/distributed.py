"""Several processes, one job: `jax.distributed` start, coordinated preemption, dead peers.

- Start: `initialize(cfg.distributed)` calls `jax.distributed.initialize` from the config
  (`--coordinator=HOST:PORT --num-processes=N --process-id=I`, the same as `distributed.*`), or,
  under SLURM or Open MPI with more than one task, with no arguments so that JAX reads the
  cluster's variables. One process per GPU, or one per node with `local_device_ids`. On CPU the
  processes talk through gloo collectives: that is how the tests run several on one machine.
- Preemption: JAX's preemption service catches SIGTERM on any process and tells the others;
  `multihost_utils.reached_preemption_sync_point(step)` turns true at the same step everywhere,
  so every process saves that step and exits together (`trainer._SigtermFlag`).
- Dead peers: a process killed with -9 never reaches the next collective, and the survivors would
  wait in it forever. A watchdog thread in each process publishes a counter in the coordinator's
  key-value store every second and reads everyone's; a process whose counter stands still for
  `distributed.peer_timeout` seconds (or a coordinator that stops answering) makes the others
  print one line and exit with code 1. JAX's own heartbeat (which aborts the process with a
  native stack trace) is set later, as a backstop.
- Data preparation once per job: `once(fn)` runs `fn` on process 0 first; the others wait at a
  barrier and then run it too, finding the cache process 0 wrote (or, with a data directory per
  node, building it once per node: store.prepare serialises the processes of one machine).
"""

import math
import os
import socket
import sys
import threading
import time
import zlib

import jax
import ml_collections
import numpy as np

from jaxtrain import sharding
from jaxtrain.errors import RunFailure, UserError

# Cluster variables under which `distributed.auto` starts jax.distributed with no arguments.
_ALIVE = "jaxtrain/alive/"


def default_config() -> ml_collections.ConfigDict:
  """Defaults for `distributed.*` (one process unless flags or a cluster say otherwise)."""
  cfg = ml_collections.ConfigDict()
  cfg.coordinator = ""  # HOST:PORT of process 0, the same for all (--coordinator); "" = alone.
  cfg.num_processes = 0  # Processes in the job (--num-processes); 0: one, or the cluster's.
  cfg.process_id = -1  # This process's index, 0 .. num_processes-1 (--process-id).
  # Local devices this process drives, e.g. "0,1,2,3" (--local-device-ids; "" = all visible).
  cfg.local_device_ids = ""
  cfg.auto = True  # Under SLURM / Open MPI with several tasks: JAX reads the cluster's variables.
  cfg.init_timeout = 300  # Seconds to wait for every process to join before failing.
  # Seconds without a sign of life from a process (killed, hung, unreachable) after which the
  # others exit with an error (code 1) instead of waiting in a collective forever.
  cfg.peer_timeout = 120
  cfg.cpu_collectives = "gloo"  # CPU collectives across processes: gloo (or mpi, with an MPI).
  return cfg


def _int(key, value, minimum):
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise UserError(f"distributed.{key} must be an integer >= {minimum}, got {value!r}")


def local_device_ids(d):
  """`distributed.local_device_ids` as a list of ints, or None."""
  text = str(d.local_device_ids).strip()
  if not text:
    return None
  try:
    ids = [int(x) for x in text.split(",")]
  except ValueError:
    raise UserError(f"distributed.local_device_ids={text!r} is not a comma-separated list of "
                    "device numbers") from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise UserError(f"distributed.local_device_ids={text!r}: numbers must be distinct and >= 0")
  return ids


def validate_config(d):
  """One-line errors naming the key; returns 'explicit', 'auto' or 'single'."""
  _int("num_processes", d.num_processes, 0)
  _int("process_id", d.process_id, -1)
  _int("init_timeout", d.init_timeout, 1)
  _int("peer_timeout", d.peer_timeout, 1)
  local_device_ids(d)
  if d.cpu_collectives not in ("gloo", "mpi"):
    raise UserError(f"distributed.cpu_collectives={d.cpu_collectives!r} is not 'gloo' or 'mpi'")
  explicit = bool(d.coordinator) or d.num_processes > 1 or d.process_id >= 0
  if explicit:
    host, sep, port = str(d.coordinator).rpartition(":")
    if not sep or not host or not port.isdigit():
      raise UserError(f"--coordinator={d.coordinator!r} must be HOST:PORT (process 0's address)")
    if d.num_processes < 1:
      raise UserError("--num-processes=N is needed with --coordinator")
    if not 0 <= d.process_id < d.num_processes:
      raise UserError(f"--process-id={d.process_id} must be in [0, {d.num_processes}) "
                      f"(--num-processes={d.num_processes})")
    return "explicit"
  # SLURM_NTASKS alone is set inside `salloc` or an sbatch script outside `srun`, where this is
  # one process: only a job step (srun) has SLURM_STEP_NODELIST, which JAX's SLURM support reads.
  slurm_step = _cluster_size("SLURM_NTASKS") > 1 and "SLURM_STEP_NODELIST" in os.environ
  if d.auto and (slurm_step or _cluster_size("OMPI_COMM_WORLD_SIZE") > 1):
    return "auto"
  return "single"


def _cluster_size(var):
  try:
    return int(os.environ.get(var, "1").split("(")[0])
  except ValueError:
    return 1


_watchdog = None


def is_initialized():
  return jax.distributed.is_initialized()


def initialize(d, log=print):
  """Start jax.distributed as `distributed.*` says (a no-op alone or when already started).

  Must run before anything asks JAX for its devices. Returns the number of processes.
  """
  global _watchdog
  mode = validate_config(d)
  if mode == "single" or jax.distributed.is_initialized():
    return jax.process_count()
  if jax.config.jax_platforms in (None, "") or "cpu" in str(jax.config.jax_platforms):
    # CPU devices only join cross-process collectives through gloo (or MPI).
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
  timeouts = dict(initialization_timeout=d.init_timeout,
                  # JAX's heartbeat aborts the process with a native stack trace: our watchdog
                  # (peer_timeout) answers first with one line and exit code 1.
                  heartbeat_timeout_seconds=2 * d.peer_timeout + 10,
                  shutdown_timeout_seconds=d.peer_timeout)
  kwargs = dict(local_device_ids=local_device_ids(d), **timeouts)
  if mode == "explicit":
    kwargs.update(coordinator_address=d.coordinator, num_processes=d.num_processes,
                  process_id=d.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # e.g. DEADLINE_EXCEEDED: a process never joined within init_timeout.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise RunFailure(f"jax.distributed.initialize failed ({first}); check --coordinator, "
                     f"--num-processes and that every process started within "
                     f"distributed.init_timeout={d.init_timeout}s") from e
  if jax.process_count() > 1:
    _watchdog = Watchdog(d.peer_timeout)
    _watchdog.start()
  return jax.process_count()


def stop_watchdog():
  """Stop watching peers (the loop is over: processes may now finish at different times)."""
  global _watchdog
  if _watchdog is not None:
    _watchdog.stop()
    _watchdog = None


class Watchdog(threading.Thread):
  """Exits this process (code 1, one line on stderr) when a peer shows no sign of life for
  `timeout` seconds or the coordinator stops answering. See the module docstring."""

  def __init__(self, timeout, interval=1.0):
    super().__init__(name="jaxtrain-peer-watchdog", daemon=True)
    from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
    self._client = jax_distributed.global_state.client  # the only handle on the key-value store
    self.timeout = self._timeout = timeout
    self._interval = min(interval, timeout / 4)
    self._stop = threading.Event()
    self._me = jax.process_index()
    self._count = jax.process_count()

  def stop(self):
    self._stop.set()

  def _fail(self, message):
    if self._stop.is_set():
      return
    print(f"error: {message}; exiting (distributed.peer_timeout={self._timeout}s)",
          file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access

  def run(self):
    beat = 0
    start = time.monotonic()
    seen = {}  # process -> (last counter, when it last changed)
    coordinator_lost = None
    while not self._stop.wait(self._interval):
      beat += 1
      now = time.monotonic()
      try:
        self._client.key_value_set(f"{_ALIVE}{self._me}", str(beat), allow_overwrite=True)
        values = dict(self._client.key_value_dir_get(_ALIVE))
        coordinator_lost = None
      except Exception as e:  # pylint: disable=broad-except
        coordinator_lost = coordinator_lost or now
        if now - coordinator_lost > self._timeout:
          self._fail(f"lost the coordinator (process 0): {str(e).splitlines()[0][:200]}")
        continue
      for p in range(self._count):
        if p == self._me:
          continue
        value = values.get(f"{_ALIVE}{p}")
        last = seen.get(p)
        if last is None or last[0] != value:
          seen[p] = (value, now)
        elif now - last[1] > self._timeout:
          self._fail(f"process {p} of {self._count} stopped responding (no sign of life for "
                     f"{now - last[1]:.0f}s: killed, hung or unreachable)")
      for p in range(self._count):
        if p != self._me and p not in seen and now - start > self._timeout:
          self._fail(f"process {p} of {self._count} never reported")


def node_of_process():
  """[node index of process p]: processes on one host (same hostname) share a node."""
  if jax.process_count() == 1:
    return [0]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  mine = np.int64(zlib.crc32(socket.gethostname().encode()))
  hosts = [int(h) for h in np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)]
  first = {}
  return [first.setdefault(h, len(first)) for h in hosts]


def hybrid_devices(devices, node_of_device, shape, dcn):
  """Devices in mesh order for a mesh of `shape` whose axes cross nodes `dcn` times each.

  Each node's devices form the within-node (ICI) mesh, shape // dcn, and the nodes tile the
  across-node (DCN) grid: along every axis, index = node coordinate * ici size + local index,
  which is the layout of `mesh_utils.create_hybrid_device_mesh` with nodes as granules (that
  function takes processes as granules; a node may run one process per GPU)."""
  ici = tuple(s // d for s, d in zip(shape, dcn))
  nodes = {}
  for device, node in zip(devices, node_of_device):
    nodes.setdefault(node, []).append(device)
  groups = [sorted(nodes[k], key=lambda d: (d.process_index, d.id)) for k in sorted(nodes)]
  per_node = math.prod(ici)
  if len(groups) != math.prod(dcn) or any(len(g) != per_node for g in groups):
    raise UserError(f"mesh: {len(groups)} nodes with {sorted(set(map(len, groups)))} devices "
                    f"each do not form mesh.dcn_* = {dcn} x within-node {ici}")
  grid = np.empty((len(groups), per_node), dtype=object)
  for k, group in enumerate(groups):
    grid[k, :] = group
  grid = grid.reshape(tuple(dcn) + ici)  # (dcn axes..., ici axes...)
  n = len(shape)
  order = [i for pair in zip(range(n), range(n, 2 * n)) for i in pair]
  return grid.transpose(order).reshape(shape)


def make_mesh(mesh_cfg):
  """The training mesh over every device of the job: flat on one node; across several nodes a
  hybrid mesh, `mesh.dcn_*` of each axis across nodes (default: data parallelism across nodes,
  FSDP and tensor parallelism inside a node, where the network is fast)."""
  shape = sharding.mesh_shape(mesh_cfg, jax.device_count())
  nodes = node_of_process()
  num_nodes = len(set(nodes))
  if num_nodes == 1:
    return sharding.make_mesh(mesh_cfg)
  dcn, _ = sharding.dcn_shape(mesh_cfg, num_nodes, shape)
  devices = jax.devices()
  ordered = hybrid_devices(devices, [nodes[d.process_index] for d in devices], shape, dcn)
  return sharding.make_mesh(mesh_cfg, list(ordered.reshape(-1)))


def exit_on_error(exc):
  """An unexpected error in a job of several processes: most often a collective failed because a
  peer died. Give the watchdog its timeout to name the dead process (it exits), else print the
  error; exit 1 either way, skipping JAX's shutdown barrier, which would wait for the dead."""
  if _watchdog is not None:
    _watchdog.join(_watchdog.timeout + 2)
  first = (str(exc).strip().splitlines() or [""])[0][:300]
  print(f"error: {type(exc).__name__}: {first} (process {jax.process_index()} of "
        f"{jax.process_count()})", file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def once(fn, name="data"):
  """fn() on process 0 first, the others after a barrier (they read what it made); returns fn()."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"jaxtrain:{name}:prepared")
  return fn() if jax.process_index() != 0 else result


def preemption_sync_point(step):
  """True on every process at the same step once any process got SIGTERM (JAX's service)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.reached_preemption_sync_point(step)


def coordinated():
  """Whether preemption goes through JAX's service (several processes) or a local flag."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return jax_distributed.global_state.preemption_sync_manager is not None


def check_batch_rows(batch_sharding, global_batch):
  """Each process feeds rows [p * b, (p + 1) * b) of the global batch (the data pipeline and
  make_array_from_process_local_data both assume it): check that this mesh puts them there."""
  n = jax.process_count()
  if n == 1:
    return
  b = global_batch // n
  indices = batch_sharding.addressable_devices_indices_map((global_batch,))
  rows = set()
  for index in indices.values():
    rows.update(range(*index[0].indices(global_batch)))
  p = jax.process_index()
  if rows != set(range(p * b, (p + 1) * b)):
    raise UserError(f"mesh: process {p}'s devices do not hold one contiguous block of the batch "
                    f"rows; put the mesh axes that cross processes first (mesh.data)")
