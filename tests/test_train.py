"""The training loop: sharded == single device, exact resume, gradient accumulation, metrics
file, checkpoints, config errors before compile."""

import json
import os

import jax
import numpy as np
import pytest

from jaxtrain import config as config_lib, sharding, trainer as train_lib
from jaxtrain.errors import UserError


def tiny_config(corpus_dir, data_dir, steps=5, **train):
  cfg = config_lib.base_config()
  cfg.model.update(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=32, attention="xla")
  cfg.data.update(source=os.path.join(corpus_dir, "*.txt"), seq_len=16, data_dir=data_dir)
  cfg.optimizer.update(lr=1e-2, warmup_steps=2)
  cfg.train.update({**dict(steps=steps, batch_size=8, log_every=1, eval_every=0, eval_batches=2,
                           progress_bar=False), **train})
  cfg.checkpoint.update(every=1000, keep=2, async_save=False)
  return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small local text corpus: enough documents for a train and a validation split."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "x"]
  for i in range(60):
    text = " ".join(rng.choice(words, size=rng.integers(40, 120)))
    (root / f"doc{i:03d}.txt").write_text(text + "\n")
  return str(root), str(tmp_path_factory.mktemp("data"))


def _mesh(shape, n):
  return sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[:n])


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r and "split" not in r]


STEPS = 6


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
  """One uninterrupted single-device run: the reference for sharding, resume and accumulation."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train_lib.train(tiny_config(*corpus, steps=STEPS), workdir, mesh=_mesh((1, 1, 1), 1),
                  log=lambda *_: None)
  return workdir


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=["data8", "data2_fsdp2_tensor2"])
def test_sharded_meshes_give_the_same_losses_as_one_device(corpus, straight_run, tmp_path, shape):
  train_lib.train(tiny_config(*corpus, steps=STEPS), str(tmp_path), mesh=_mesh(shape, 8),
                  log=lambda *_: None)
  assert len(_losses(straight_run)) == STEPS
  np.testing.assert_allclose(_losses(str(tmp_path)), _losses(straight_run), rtol=1e-4)


def test_resume_reproduces_the_uninterrupted_run_bitwise(corpus, straight_run, tmp_path):
  cfg = tiny_config(*corpus, steps=STEPS)
  mesh = _mesh((1, 1, 1), 1)
  resumed = str(tmp_path)
  train_lib.train(cfg, resumed, mesh=mesh, stop_after=STEPS // 2, log=lambda *_: None)
  assert len(_losses(resumed)) == STEPS // 2
  train_lib.train(cfg, resumed, mesh=mesh, log=lambda *_: None)
  assert _losses(resumed) == _losses(straight_run)
  s = train_lib.make_setup(cfg, mesh)
  from jaxtrain import evaluate
  _, a = evaluate.load_params(straight_run, s.abstract_state.params)
  _, b = evaluate.load_params(resumed, s.abstract_state.params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_four_microbatches_of_two_equal_one_batch_of_eight(corpus, straight_run, tmp_path):
  four = tiny_config(*corpus, steps=STEPS, microbatches=4)
  train_lib.train(four, str(tmp_path), mesh=_mesh((1, 1, 1), 1), log=lambda *_: None)
  np.testing.assert_allclose(_losses(str(tmp_path)), _losses(straight_run), rtol=1e-5)


def test_metrics_file_checkpoints_and_plot_are_written(corpus, tmp_path):
  cfg = tiny_config(*corpus, steps=4, eval_every=2)
  cfg.checkpoint.every = 2
  workdir = str(tmp_path / "run")
  train_lib.train(cfg, workdir, mesh=_mesh((1, 1, 1), 1), log=lambda *_: None)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if "split" not in r]
  evals = [r for r in records if r.get("split") == "validation"]
  for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_device", "mfu",
              "elapsed_sec"):
    assert all(key in r for r in train), key
  assert [r["step"] for r in evals] == [2, 4]
  assert all(r["bits_per_byte"] > 0 and r["eval_loss"] > 0 for r in evals)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 4
  assert os.path.getsize(os.path.join(workdir, "loss.png")) > 1000


def test_loss_chunks_do_not_change_the_loss():
  import jax.numpy as jnp
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k1, (2, 12, 8))
  w = jax.random.normal(k2, (8, 50))
  t = jax.random.randint(k3, (2, 12), 0, 50)
  full = train_lib.cross_entropy_sum(h, w, t, chunk=12)
  for chunk in (1, 3, 4):
    np.testing.assert_allclose(train_lib.cross_entropy_sum(h, w, t, chunk=chunk), full, rtol=1e-5)
  logits = h @ w
  expected = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1))
  np.testing.assert_allclose(full, expected, rtol=1e-5)
  g_full = jax.grad(lambda h: train_lib.cross_entropy_sum(h, w, t, chunk=12))(h)
  g_chunk = jax.grad(lambda h: train_lib.cross_entropy_sum(h, w, t, chunk=3))(h)
  np.testing.assert_allclose(g_chunk, g_full, rtol=1e-5, atol=1e-6)


BAD_CONFIGS = [
    ("model.n_heads", lambda c: c.model.update(n_heads=3)),
    ("model.n_kv_heads", lambda c: c.model.update(n_kv_heads=3)),
    ("model.dtype", lambda c: c.model.update(dtype="fp8")),
    ("train.batch_size", lambda c: c.train.update(batch_size=0)),
    ("train.microbatches", lambda c: c.train.update(microbatches=3)),
    ("train.steps", lambda c: c.train.update(steps=-5)),
    ("data.seq_len", lambda c: c.data.update(seq_len=64)),
    ("optimizer.lr", lambda c: c.optimizer.update(lr=-1.0)),
    ("optimizer.name", lambda c: c.optimizer.update(name="sgd")),
    ("mesh.data", lambda c: c.mesh.update(data=3)),
    ("mesh.tensor", lambda c: c.mesh.update(tensor=0)),
    ("data-parallel size", lambda c: c.mesh.update(data=8)),
    ("checkpoint.every", lambda c: c.checkpoint.update(every=0)),
]


@pytest.mark.parametrize("culprit, mutate", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_is_a_one_line_error_before_compile(corpus, culprit, mutate):
  cfg = tiny_config(*corpus)
  cfg.train.batch_size = 4 if culprit == "data-parallel size" else cfg.train.batch_size
  mutate(cfg)
  with pytest.raises(UserError) as e:
    config_lib.validate(cfg, num_devices=8)
  assert culprit in str(e.value) and "\n" not in str(e.value)


def test_override_of_an_unknown_key_names_it():
  cfg = config_lib.base_config()
  with pytest.raises(UserError, match="train.stepz"):
    config_lib.apply_override(cfg, "train.stepz", "3")
  with pytest.raises(UserError, match="not an integer"):
    config_lib.apply_override(cfg, "train.steps", "many")
  config_lib.apply_override(cfg, "train.steps", "7")
  config_lib.apply_override(cfg, "model.tie_embeddings", "true")
  assert cfg.train.steps == 7 and cfg.model.tie_embeddings is True


def test_state_is_created_and_restored_with_the_target_shardings(corpus, straight_run):
  """Orbax must restore onto the mesh asked for, not the one that wrote the checkpoint."""
  from jax.sharding import PartitionSpec as P
  from jaxtrain import checkpoint as checkpoint_lib
  cfg = tiny_config(*corpus, steps=STEPS)
  s = train_lib.make_setup(cfg, _mesh((2, 2, 2), 8))
  wq = s.state_shardings.params["blocks"]["attn"]["wq"]
  assert wq.spec == P(None, "fsdp", "tensor", None)
  assert s.state_shardings.params["embed"]["embedding"].spec == P("tensor", "fsdp")
  fresh = s.init(0)
  assert fresh.params["blocks"]["attn"]["wq"].sharding == wq
  mu = [x for x in jax.tree.leaves(fresh.opt_state) if x.shape == (2, 32, 4, 8)]
  assert mu and all(x.sharding.spec == wq.spec for x in mu)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(straight_run, "checkpoints"), read_only=True)
  restored = ckpt.restore(STEPS, s.abstract_state.params, s.abstract_state.opt_state)
  ckpt.close()
  got = restored["params"]["blocks"]["attn"]["wq"]
  assert got.sharding == wq and len(got.sharding.device_set) == 8
