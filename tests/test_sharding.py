"""The sharded step splits the work: XLA's per-device FLOPs and bytes of the compiled training
step on 8 fake CPU devices (tests/conftest.py) against the 1-device step divided by 8.

Layers are unrolled and the loss is one chunk, so that XLA's cost analysis (which counts a loop
body once) counts every layer on both sides; Newton-Schulz is unrolled for the same reason
(`unroll_loops`). Nothing is allocated: the steps are only compiled.
"""

import jax
import numpy as np
import pytest

from jaxtrain import config as config_lib, planner, sharding, trainer


def tiny_config(optimizer="adamw", mesh=(-1, 1, 1), n_layers=2):
  cfg = config_lib.base_config()
  cfg.model.update(vocab_size=512, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                   d_ff=256, max_seq_len=64, attention="xla", scan_layers=False)
  cfg.data.seq_len = 64
  cfg.optimizer.name = optimizer
  cfg.train.update(batch_size=16, loss_chunk=64, steps=10)
  cfg.optimizer.warmup_steps = 1
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return cfg


MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp4": (2, 4, 1), "fsdp4_tensor2": (1, 4, 2)}


def _flops(cfg, n):
  return planner._flops(planner.compile_step(cfg, jax.devices()[:n], unroll_loops=True)[1])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_mesh_splits_the_step_flops_over_its_devices(optimizer):
  one = _flops(tiny_config(optimizer, (1, 1, 1)), 1)
  for name, shape in MESHES.items():
    ratio = _flops(tiny_config(optimizer, shape), 8) / (one / 8)
    assert ratio <= 1.15, (optimizer, name, ratio)


def test_fsdp_holds_no_more_activations_than_data_parallel_and_an_eighth_of_the_state():
  data = planner.compile_step(tiny_config(mesh=(8, 1, 1)), jax.devices())[1].memory_analysis()
  s, fsdp = planner.compile_step(tiny_config(mesh=(1, 8, 1)), jax.devices())
  fsdp = fsdp.memory_analysis()
  assert fsdp.temp_size_in_bytes <= 1.3 * data.temp_size_in_bytes, (
      fsdp.temp_size_in_bytes, data.temp_size_in_bytes)
  one = trainer.make_setup(tiny_config(mesh=(1, 1, 1)), sharding.make_mesh(
      {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  total = planner._shard_bytes(one.abstract_state)
  assert planner._shard_bytes(s.abstract_state) <= 1.1 * total / 8


def _ns_flops(cfg, n):
  """XLA's FLOPs per device of the optimizer update alone (Newton-Schulz unrolled)."""
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, MESHES["fsdp8"] if n == 8 else
                                     (1, 1, 1))), jax.devices()[:n])
  cfg.mesh.update(data=mesh.shape["data"], fsdp=mesh.shape["fsdp"], tensor=mesh.shape["tensor"])
  s = trainer.make_setup(cfg, mesh, unroll_loops=True)
  params, opt_state = s.abstract_state.params, s.abstract_state.opt_state
  shardings = (s.state_shardings.params, s.state_shardings.opt_state, s.state_shardings.params)
  with jax.set_mesh(mesh):
    compiled = jax.jit(s.tx.update, in_shardings=shardings).lower(
        params, opt_state, params).compile()
  return planner._flops(compiled)


@pytest.mark.parametrize("n_layers", [8, 3], ids=["layers_divide", "layers_do_not_divide"])
def test_newton_schulz_is_split_over_every_device(n_layers):
  """3 layers on 8 devices: 12 attention and 9 MLP matrices; 8 of each are split whole, the
  rest by columns, so no device orthogonalises a matrix that another one does too."""
  one = _ns_flops(tiny_config("muon", n_layers=n_layers), 1)
  eight = _ns_flops(tiny_config("muon", n_layers=n_layers), 8)
  assert eight <= 1.2 * one / 8, eight / (one / 8)


def test_the_planner_reports_xla_numbers_for_a_gpu_preset_on_fake_devices():
  cfg = config_lib.load_config("configs/llama.py:toy,a40", [
      ("model.n_layers", "2"), ("data.seq_len", "128"), ("train.batch_size_per_device", "2")])
  p = planner.plan(cfg, devices=8)
  assert p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert p["global_batch"] == 16 and p["target"] == "NVIDIA A40"
  assert p["device_memory_bytes"] == 45 * 2 ** 30 and p["fits"] is True
  for key in ("state_bytes_per_device", "temp_bytes_per_device", "flops_per_device",
              "model_flops_per_step"):
    assert p[key] > 0, key
  # XLA counts the model's matmuls and more (full attention scores, the optimizer), not less.
  assert 1.0 <= p["xla_flops_over_model_flops"] < 1.5
  assert np.isclose(p["step_seconds_at_mfu"],
                    p["model_flops_per_step"] / (8 * 149.7e12 * 0.4))


def test_the_planner_refuses_a_bad_config_before_compiling():
  cfg = tiny_config()
  cfg.train.batch_size = 12
  with pytest.raises(config_lib.UserError, match="train.batch_size"):
    planner.plan(cfg, devices=8)
