"""Several processes through the CLI: jax.distributed over 127.0.0.1 with gloo collectives, two
CPU devices per process. Same losses as one process, resume on other topologies, coordinated
SIGTERM, a killed process, data prepared once. Every wait has a hard timeout, so a hang fails."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40  # Every run has the same train.steps, so the lr schedule is the same in all of them.
TIMEOUT = 240  # Seconds any launch may take before the test fails (instead of hanging CI).

CONFIG = '''"""Tiny LLaMA for tests/test_distributed.py."""
from jaxtrain.config import base_config


def get_config(arg=""):
  del arg
  cfg = base_config()
  cfg.model.update(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=32, attention="xla")
  cfg.data.update(source={source!r}, seq_len=16, data_dir={data_dir!r}, tokenizer="bpe")
  cfg.optimizer.update(lr=1e-2, warmup_steps=2)
  cfg.train.update(steps={steps}, batch_size=8, log_every=1, eval_every=0, eval_batches=2,
                   progress_bar=False)
  cfg.checkpoint.update(every=1000, keep=2, async_save=False)
  cfg.distributed.update(init_timeout=60, peer_timeout=30)
  return cfg
'''


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  root = tmp_path_factory.mktemp("dist")
  corpus = root / "corpus"
  corpus.mkdir()
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "x"]
  for i in range(60):
    (corpus / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, rng.integers(40, 120))))
  path = root / "tiny.py"
  path.write_text(CONFIG.format(source=str(corpus / "*.txt"), data_dir=str(root / "data"),
                                steps=STEPS))
  return str(path)


class Job:
  """`n` processes of `jaxtrain train`, each with `devices` CPU devices; outputs in files."""

  def __init__(self, config_file, workdir, n, devices, mesh, *extra):
    self.workdir = workdir
    port = free_port()
    # A compilation cache shared by this file's runs (compiling dominates them): the runs on one
    # topology compile the same programs.
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.dirname(config_file), "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    data, fsdp = mesh
    self.procs, self.logs = [], []
    for i in range(n):
      argv = [sys.executable, "-m", "jaxtrain.cli", "train", f"--config={config_file}",
              f"--workdir={workdir}", f"--config.mesh.data={data}",
              f"--config.mesh.fsdp={fsdp}", *extra]
      if n > 1:
        argv += [f"--coordinator=127.0.0.1:{port}", f"--num-processes={n}", f"--process-id={i}"]
      log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.{i}.log"),
                 "w+")
      self.logs.append(log)
      self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=ROOT))

  def wait(self, timeout=TIMEOUT):
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(1, deadline - time.time())) for p in self.procs]
    finally:
      self.kill()

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def output(self, i):
    self.logs[i].flush()
    with open(self.logs[i].name) as f:
      return f.read()

  def wait_for_step(self, step, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
      if len(losses(self.workdir)) >= step:
        return
      if any(p.poll() is not None for p in self.procs):
        break
      time.sleep(0.1)
    self.kill()
    raise AssertionError(f"no step {step} in {self.workdir}:\n{self.output(0)[-3000:]}")


def losses(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
  except (OSError, ValueError):
    return {}


@pytest.fixture(scope="module")
def preempted(config_file, tmp_path_factory):
  """2 processes x 2 devices on (data=2, fsdp=2), fresh data directory; SIGTERM to process 1
  after step 3. Returns (job, exit codes, seconds from the signal to both exits)."""
  workdir = str(tmp_path_factory.mktemp("two") / "run")
  job = Job(config_file, workdir, 2, 2, (2, 2))
  job.wait_for_step(3)
  job.procs[1].send_signal(signal.SIGTERM)
  t0 = time.time()
  codes = job.wait(timeout=120)
  return job, codes, time.time() - t0


@pytest.fixture(scope="module")
def reference(config_file, preempted, tmp_path_factory):
  """1 process x 4 devices, same config and mesh, uninterrupted (after `preempted`, so that
  the two-process run is the one that prepares the data)."""
  del preempted
  workdir = str(tmp_path_factory.mktemp("one") / "run")
  job = Job(config_file, workdir, 1, 4, (2, 2))
  assert job.wait() == [0], job.output(0)[-3000:]
  result = losses(workdir)
  assert sorted(result) == list(range(1, STEPS + 1))
  return result


def _preempted_step(job):
  steps = []
  for i in range(2):
    out = job.output(i)
    assert "preempted (SIGTERM) at step " in out, out[-3000:]
    steps.append(int(out.split("preempted (SIGTERM) at step ")[1].split(":")[0]))
  return steps


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_exits(preempted):
  job, codes, seconds = preempted
  assert codes == [1, 1], job.output(0)[-3000:]
  steps = _preempted_step(job)
  assert steps[0] == steps[1] and 3 <= steps[0] < STEPS, steps
  assert os.path.isdir(os.path.join(job.workdir, "checkpoints", str(steps[0])))
  assert seconds < 60
  print(f"SIGTERM to process 1: both saved step {steps[0]} and exited in {seconds:.1f}s")


def test_data_preparation_ran_once(preempted):
  job, _, _ = preempted
  outputs = [job.output(i) for i in range(2)]
  assert [o.count("prepared data") for o in outputs] == [1, 0], outputs[1][-2000:]


def test_two_processes_give_the_losses_of_one_process(preempted, reference):
  job, _, _ = preempted
  two = losses(job.workdir)
  steps = sorted(two)
  assert steps == list(range(1, _preempted_step(job)[0] + 1))
  np.testing.assert_allclose([two[s] for s in steps], [reference[s] for s in steps], rtol=1e-5)


@pytest.mark.parametrize("n, devices, mesh", [(2, 2, (1, 4)), (1, 4, (2, 2))],
                         ids=["2proc_fsdp4", "1proc"])
def test_resume_on_another_topology_continues_the_loss_curve(
    config_file, preempted, reference, tmp_path, n, devices, mesh):
  job, _, _ = preempted
  workdir = str(tmp_path / "run")
  shutil.copytree(job.workdir, workdir)
  stopped = max(losses(workdir))
  resumed = Job(config_file, workdir, n, devices, mesh)
  assert resumed.wait() == [0] * n, resumed.output(0)[-3000:]
  assert "resumed from" in resumed.output(0)
  after = losses(workdir)
  assert sorted(after) == list(range(1, STEPS + 1))
  steps = range(stopped + 1, STEPS + 1)
  np.testing.assert_allclose([after[s] for s in steps], [reference[s] for s in steps], rtol=1e-5)


def test_a_killed_process_makes_the_other_exit_with_an_error(config_file, preempted, tmp_path):
  del preempted  # Its data directory is ready.
  workdir = str(tmp_path / "run")
  # The config of `preempted` (its compiled programs are in the cache); the survivor cannot
  # finish its steps without the killed process.
  job = Job(config_file, workdir, 2, 2, (2, 2), "--config.distributed.peer_timeout=5")
  job.wait_for_step(2)
  job.procs[1].send_signal(signal.SIGKILL)
  t0 = time.time()
  codes = job.wait(timeout=60)
  seconds = time.time() - t0
  out = job.output(0)
  assert codes[0] == 1, out[-3000:]
  assert "error: process 1 of 2 stopped responding" in out, out[-3000:]
  assert seconds < 5 + 15, seconds
  print(f"kill -9 of process 1: process 0 exited (code 1) after {seconds:.1f}s")


def test_hybrid_mesh_keeps_fsdp_inside_a_node_and_data_across_nodes():
  import jax  # pylint: disable=import-outside-toplevel
  from jaxtrain import config as config_lib, distributed, sharding  # pylint: disable=import-outside-toplevel
  from jaxtrain.errors import UserError  # pylint: disable=import-outside-toplevel
  devices = jax.devices()[:8]
  node = [d.id // 4 for d in devices]  # two nodes of four devices
  cfg = config_lib.base_config().mesh
  cfg.update(data=2, fsdp=4)
  shape = sharding.mesh_shape(cfg, 8)
  dcn, ici = sharding.dcn_shape(cfg, 2, shape)
  assert (dcn, ici) == ((2, 1, 1), (1, 4, 1))
  grid = distributed.hybrid_devices(devices, node, shape, dcn)
  for i in range(2):  # every fsdp group is one node; the data axis crosses nodes
    assert {node[d.id] for d in grid[i, :, 0]} == {i}
  cfg.update(data=4, fsdp=2)  # data across and inside nodes
  grid = distributed.hybrid_devices(devices, node, sharding.mesh_shape(cfg, 8), (2, 1, 1))
  assert [node[d.id] for d in grid[:, 0, 0]] == [0, 0, 1, 1]
  cfg.update(data=1, fsdp=8)  # FSDP over 8 devices cannot stay inside 4-device nodes
  with pytest.raises(UserError,
                     match="mesh.data=1 is not divisible by mesh.dcn_data=2 .*set mesh.data=2"):
    sharding.dcn_shape(cfg, 2, sharding.mesh_shape(cfg, 8))
  cfg.update(dcn_data=1, dcn_fsdp=2)  # ...unless the user says so
  grid = distributed.hybrid_devices(devices, node, sharding.mesh_shape(cfg, 8),
                                    sharding.dcn_shape(cfg, 2, (1, 8, 1))[0])
  assert [node[d.id] for d in grid[0, :, 0]] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("flags, culprit", [
    (["--coordinator=nohost", "--num-processes=2", "--process-id=0"], "--coordinator"),
    (["--coordinator=127.0.0.1:1", "--num-processes=2", "--process-id=2"], "--process-id=2"),
    (["--coordinator=127.0.0.1:1", "--process-id=0"], "--num-processes"),
    (["--local-device-ids=0,x"], "distributed.local_device_ids"),
    (["--num-processes=two"], "distributed.num_processes"),
    (["--config.mesh.dcn_fsdp=0"], "mesh.dcn_fsdp"),
])
def test_bad_distributed_flags_are_one_line_and_exit_code_2(flags, culprit, capsys, tmp_path):
  from jaxtrain import cli  # pylint: disable=import-outside-toplevel
  code = cli.main(["train", f"--workdir={tmp_path}/w", *flags])
  err = capsys.readouterr().err.strip()
  assert code == 2 and culprit in err and len(err.splitlines()) == 1, err


def test_the_planner_prints_the_hybrid_split():
  from jaxtrain import config as config_lib, planner  # pylint: disable=import-outside-toplevel
  from jaxtrain.errors import UserError  # pylint: disable=import-outside-toplevel
  cfg = config_lib.base_config()
  cfg.model.update(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=32, attention="xla")
  cfg.data.seq_len = 16
  cfg.train.batch_size = 8
  cfg.mesh.update(data=2, fsdp=4)
  with pytest.raises(UserError, match="--nodes=3"):
    planner.plan(cfg, devices=8, nodes=3)
  result = planner.plan(cfg, devices=8, nodes=2, flops=False)
  assert result["mesh_across_nodes"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert result["mesh_within_node"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert "hybrid mesh on 2 nodes" in planner.format_plan(result)


def test_slurm_auto_mode_needs_a_job_step(monkeypatch):
  """SLURM_NTASKS is set inside salloc or an sbatch script outside srun, where jaxtrain is one
  process: only an srun step (SLURM_STEP_NODELIST) starts jax.distributed."""
  from jaxtrain import config as config_lib, distributed  # pylint: disable=import-outside-toplevel
  d = config_lib.base_config().distributed
  for var in ("SLURM_NTASKS", "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.validate_config(d) == "single"
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[01-02]")
  assert distributed.validate_config(d) == "auto"


def test_probe_files_of_processes_with_the_same_pid_on_other_hosts_do_not_clash(tmp_path,
                                                                                  monkeypatch):
  from jaxtrain import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  real_remove, removed = os.remove, []

  def remove(path):
    removed.append(os.path.basename(path))
    real_remove(path)
  monkeypatch.setattr(os, "remove", remove)
  checkpoint_lib.check_writable(str(tmp_path / "run"))
  assert removed and all(socket.gethostname() in name for name in removed)
