"""Optimizer study runner (skip, resume, lr-grid extension, report) and the methods beside Muon:
Gram Newton-Schulz, Hyperball (MuonH/AdamH), QK-clip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import config as config_lib, model as model_lib, optim, sharding, study
from jaxtrain import trainer
from jaxtrain.errors import UserError


def tiny_config(corpus_dir, data_dir, steps=6, **opt):
  cfg = config_lib.base_config()
  cfg.model.update(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                   max_seq_len=32, attention="xla")
  cfg.data.update(source=os.path.join(corpus_dir, "*.txt"), seq_len=16, data_dir=data_dir)
  cfg.optimizer.update(lr=1e-2, warmup_steps=2, **opt)
  cfg.train.update(steps=steps, batch_size=8, log_every=1, eval_every=3, eval_batches=1,
                   progress_bar=False)
  cfg.checkpoint.update(every=1000, keep=1, async_save=False)
  return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "x"]
  for i in range(40):
    (root / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, size=80)) + "\n")
  return str(root), str(tmp_path_factory.mktemp("data"))


def _one_device():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


# ---------------------------------------------------------------------------------------------
# Gram Newton-Schulz


@pytest.mark.parametrize("preset", ["standard", "polar_express"])
def test_gram_newton_schulz_matches_standard_newton_schulz(preset):
  rng = np.random.default_rng(0)
  for shape in [(3, 24, 96), (2, 96, 24)]:  # wide and tall: Gram NS runs (uses_gram)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    assert optim.uses_gram(*shape[1:], 5)
    want = optim.orthogonalize(x, preset, 5)
    for restart in (0, 2):
      got = optim.orthogonalize(x, preset, 5, method="gram", gram_restart=restart)
      np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.max(jnp.abs(want))))


def test_gram_newton_schulz_split_over_eight_devices_matches_one_device():
  """11 matrices on 8 devices: 8 split whole, 3 split by columns (X X^T all-reduced)."""
  import importlib  # pylint: disable=import-outside-toplevel
  muon_lib = importlib.import_module("jaxtrain.optim.muon")  # optim.muon is the function
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices()[:8])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(11, 32, 96)), jnp.float32)
  coeffs, prescale = optim.ns_coefficients("standard", 5)
  want = muon_lib._orthogonalize_wide(x, coeffs, prescale, 1e-7, jnp.float32)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda x: muon_lib._split_newton_schulz(
        x, coeffs, prescale, 1e-7, jnp.float32, mesh, ("data",), method="gram"))(x)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_gram_newton_schulz_has_fewer_flops_by_xla_count_and_square_matrices_keep_standard():
  x = jnp.ones((2, 32, 128), jnp.float32)
  flops = {}
  for method in optim.NS_METHODS:
    fn = jax.jit(lambda x, m=method: optim.orthogonalize(x, "standard", 5, method=m, unroll=True))
    flops[method] = fn.lower(x).compile().cost_analysis()["flops"]
  predicted = optim.ns_flops(32, 128, 5, "gram") / optim.ns_flops(32, 128, 5)
  assert flops["gram"] < 0.7 * flops["standard"]
  assert abs(flops["gram"] / flops["standard"] - predicted) < 0.02
  assert not optim.uses_gram(64, 64, 5)
  assert optim.ns_flops(64, 64, 5, "gram") == optim.ns_flops(64, 64, 5)


# ---------------------------------------------------------------------------------------------
# Hyperball


def _matrix_norms(params):
  out = {}
  for path, layout in (("blocks/attn/wq", "bioo"), ("blocks/mlp/w_down", "bio")):
    node = params
    for key in path.split("/"):
      node = node[key]
    out[path] = np.sqrt(np.sum(np.square(np.asarray(node, np.float64)),
                               axis=tuple(range(1, len(layout)))))
  return out


@pytest.mark.parametrize("name", ["muon", "adamw"], ids=["MuonH", "AdamH"])
def test_hyperball_keeps_weight_and_update_frobenius_norms_fixed(name):
  cfg = config_lib.base_config()
  cfg.model.update(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=16, attention="xla")
  cfg.optimizer.update(name=name, hyperball=True, lr=0.05, warmup_steps=0, schedule="constant",
                       clip_norm=0.0)
  c = model_lib.ModelConfig.from_config(cfg.model)
  _, params = model_lib.params_of(model_lib.create(c, 0))
  tx = optim.build_optimizer(cfg.optimizer, 10)
  state = tx.init(params)
  norms0 = _matrix_norms(params)
  rng = np.random.default_rng(1)

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape) * 10.0, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  for k in range(4):
    before = params
    params, state, updates = step(params, state, jax.random.key(int(rng.integers(1 << 30))))
    for path, n in _matrix_norms(params).items():
      np.testing.assert_allclose(n, norms0[path], rtol=1e-5, err_msg=f"{path} step {k}")
    # The step is an angle: about 2 R sin(theta / 2) with tan(theta) = lr (exact when the update
    # is orthogonal to W; random gradients nearly are).
    wq0, wq1 = before["blocks"]["attn"]["wq"], params["blocks"]["attn"]["wq"]
    moved = np.sqrt(np.sum(np.square(np.asarray(wq1 - wq0, np.float64)), axis=(1, 2, 3)))
    want = 2 * norms0["blocks/attn/wq"] * np.sin(np.arctan(0.05) / 2)
    np.testing.assert_allclose(moved, want, rtol=2e-2)
  # The embedding is not a hidden matrix: AdamW moves it freely.
  assert not np.allclose(np.linalg.norm(params["embed"]["embedding"]),
                         np.linalg.norm(model_lib.params_of(model_lib.create(c, 0))[1]["embed"]
                                        ["embedding"]), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# QK-clip


def test_qk_clip_caps_the_measured_max_logit_with_gqa_and_rope():
  cfg = config_lib.base_config()
  cfg.model.update(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=16, attention="xla", init_std=0.5)  # large init: big logits
  c = model_lib.ModelConfig.from_config(cfg.model)
  graphdef, params = model_lib.params_of(model_lib.create(c, 0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)

  def max_logits(params):
    return nnx_model(params).hidden_states(tokens, with_max_logits=True)[1]

  from flax import nnx  # pylint: disable=import-outside-toplevel
  nnx_model = lambda p: nnx.merge(graphdef, p)
  before = np.asarray(max_logits(params))
  assert before.shape == (2, 4)
  tau = float(np.median(before))
  assert before.max() > tau
  clipped = optim.clip_qk(params, jnp.asarray(before), tau)
  after = np.asarray(max_logits(clipped))
  # Layer 0's logits depend on its own weights only; deeper layers see changed inputs, so the cap
  # is exact for layer 0 and checked there, and heads under tau in a group under tau are kept.
  assert np.all(after[0] <= tau * (1 + 1e-4)), (after[0], tau)
  untouched = before[0] <= tau
  groups_under = (before[0].reshape(2, 2) <= tau).all(axis=1).repeat(2)
  np.testing.assert_allclose(after[0][untouched & groups_under],
                             before[0][untouched & groups_under], rtol=1e-5)


def test_qk_clip_in_training_logs_the_max_logit_and_keeps_it_near_tau(corpus, tmp_path):
  cfg = tiny_config(*corpus, steps=4, name="muon", qk_clip_tau=0.5)
  cfg.model.init_std = 0.3
  cfg.train.eval_every = 0
  trainer.train(cfg, str(tmp_path), mesh=_one_device(), log=lambda *_: None)
  with open(tmp_path / "metrics.jsonl") as f:
    logits = [r["max_logit"] for r in map(json.loads, f) if "max_logit" in r]
  assert len(logits) == 4 and logits[0] > 0.5
  # After the first clip the logit measured in the next steps (new batches, one update later)
  # stays near tau, far below the unclipped start.
  assert max(logits[1:]) < min(logits[0], 0.5 * 1.5), logits


# ---------------------------------------------------------------------------------------------
# The study runner


def _fake_train(best_lr, calls, steps_done=None):
  """A stand-in for trainer.train: final loss is a parabola in log(lr), minimal at best_lr."""

  def train(cfg, workdir):
    calls.append(workdir)
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
    final = 3.0 + (np.log(cfg.optimizer.lr / best_lr)) ** 2 + 0.01 * cfg.train.seed
    steps = cfg.train.steps
    upto = steps if steps_done is None else steps_done
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      every = cfg.train.eval_every
      for s in sorted(set(range(every, upto + 1, every)) | ({steps} if upto == steps else set())):
        loss = final + 2.0 * (1 - s / steps)
        f.write(json.dumps({"step": s, "loss": loss, "tokens_per_sec": 1000.0}) + "\n")
        f.write(json.dumps({"step": s, "split": "validation", "eval_loss": loss}) + "\n")
  return train


def test_study_extends_an_edge_lr_until_bracketed_and_skips_finished_runs(corpus, tmp_path):
  cfg = tiny_config(*corpus, steps=20)
  calls = []
  report = study.run_study(cfg, ["adamw", "muon"], 2, str(tmp_path),
                           lrs={"adamw": [1e-3, 2e-3, 4e-3], "muon": [1e-2, 2e-2, 4e-2]},
                           train_fn=_fake_train(1.6e-2, calls), log=lambda *_: None)
  adamw, muon = report["optimizers"]["adamw"], report["optimizers"]["muon"]
  # adamw's optimum (1.6e-2) is above its grid: 8e-3, 1.6e-2 and 3.2e-2 were added, the last
  # bracketing it; muon's grid already brackets it.
  assert [r["lr"] for r in adamw["lr_grid"]] == pytest.approx(
      [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2])
  assert adamw["best_lr"] == pytest.approx(1.6e-2) and adamw["bracketed"]
  assert muon["best_lr"] == pytest.approx(2e-2) and muon["bracketed"]
  assert len(calls) == 2 * (6 + 3)
  assert adamw["final_loss_mean"] == pytest.approx(3.005)
  assert adamw["final_loss_std"] == pytest.approx(0.005)
  assert report["target"] == {"optimizer": "adamw", "loss": pytest.approx(3.005)}
  assert muon["to_target"] is None or muon["to_target"]["steps"] <= 20
  # Training seconds at the fake 1000 tokens/s: 20 steps of 8 x 16 tokens.
  assert adamw["to_target"]["wall_sec"] == pytest.approx(20 * 128 / 1000)
  assert report["runs"] == {"skipped": 0, "resumed": 0, "new": 18, "failed": 0}
  for name in ("study.json", "study.md", "study.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert "| adamw | 0.016 |" in (tmp_path / "study.md").read_text()
  # The same command again trains nothing: every run is finished.
  calls.clear()
  again = study.run_study(cfg, ["adamw", "muon"], 2, str(tmp_path),
                          lrs={"adamw": [1e-3, 2e-3, 4e-3], "muon": [1e-2, 2e-2, 4e-2]},
                          train_fn=_fake_train(1.6e-2, calls), log=lambda *_: None)
  assert calls == [] and again["runs"]["skipped"] == 18
  assert again["optimizers"]["adamw"]["lr_grid"] == adamw["lr_grid"]
  # Other settings on the same directory are refused, not resumed into the old runs.
  with pytest.raises(UserError, match="different train.steps"):
    study.run_study(cfg, ["adamw"], 1, str(tmp_path), steps=30, lrs={"adamw": [1e-3]},
                    train_fn=_fake_train(1.6e-2, calls), log=lambda *_: None)
  assert calls == []


def test_study_rejects_bad_input_before_training(corpus, tmp_path):
  cfg = tiny_config(*corpus)
  never = lambda *a: pytest.fail("trained")
  cfg.optimizer.schedule = "constant"
  with pytest.raises(UserError, match="decays to the end"):
    study.run_study(cfg, ["adamw"], 1, str(tmp_path), train_fn=never)
  with pytest.raises(UserError, match="unknown optimizer 'adan'"):
    study.parse_optimizers("adamw,adan")
  with pytest.raises(UserError, match="--lrs"):
    study.parse_lrs("muon:1e-3/adamw:x", ["adamw", "muon"])
  assert study.parse_lrs("adamw:1e-3,2e-3/muon:0.02", ["adamw", "muon"]) == {
      "adamw": [1e-3, 2e-3], "muon": [0.02]}
  from jaxtrain import cli  # pylint: disable=import-outside-toplevel
  assert cli.main(["study", "--optimizers=adamw,sgd", f"--workdir={tmp_path}"]) == 2
  assert cli.main(["study", "--optimizers=adamw"]) == 2


def test_study_resumes_an_unfinished_run_end_to_end(corpus, tmp_path):
  """One real tiny run interrupted after 3 of 6 steps; the study resumes it from its checkpoint
  (not from scratch), finishes it, and reports from the real metrics."""
  cfg = tiny_config(*corpus, steps=6)
  cfg.checkpoint.every = 3
  run_cfg = study.run_config(cfg, "muon_gram", 1e-2, 0, None)
  wd = tmp_path / "muon_gram" / study.lr_tag(1e-2) / "seed0"
  trainer.train(run_cfg, str(wd), mesh=_one_device(), stop_after=3, log=lambda *_: None)
  assert study.run_status(str(wd), 6) == "partial"
  logs = []

  def train(cfg, workdir):
    return trainer.train(cfg, workdir, mesh=_one_device(), log=logs.append)

  report = study.run_study(cfg, ["muon_gram"], 1, str(tmp_path), lrs={"muon_gram": [1e-2]},
                           max_extend=0, train_fn=train, log=logs.append)
  assert any("resumed from" in str(line) for line in logs), logs
  assert report["runs"] == {"skipped": 0, "resumed": 1, "new": 0, "failed": 0}
  assert study.run_status(str(wd), 6) == "done"
  o = report["optimizers"]["muon_gram"]
  assert np.isfinite(o["final_loss_mean"]) and o["curve_steps"][-1] == 6
  # Muon's FLOPs include Newton-Schulz: Gram NS on the wide (32 x 96) MLP kernels.
  assert o["optimizer_flops_per_step"] > 0
  assert o["to_target"]["steps"] == pytest.approx(6)


def test_run_status_reads_past_a_half_written_metrics_line(tmp_path):
  """A kill or a full disk can leave half a line; the study must still see the run's state."""
  lines = [{"step": 4, "loss": 3.0}, {"step": 4, "split": "validation", "eval_loss": 3.1}]
  text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "split": "validation", "eval'
  (tmp_path / "metrics.jsonl").write_text(text)
  assert study.run_status(str(tmp_path), 4) == "done"
  assert study.run_status(str(tmp_path), 6) == "new"
