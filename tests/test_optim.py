"""The optimizer config: defaults, validation messages, schedules, and the AdamW baseline."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxtrain import optim
from jaxtrain.errors import UserError


def cfg_with(**overrides):
  cfg = optim.default_config()
  for key, value in overrides.items():
    section = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      section = section[p]
    section[leaf] = value
  return cfg


def test_default_config_is_valid_and_builds_both_optimizers():
  optim.validate_config(optim.default_config())
  for name in optim.NAMES:
    assert isinstance(optim.build_optimizer(cfg_with(name=name), total_steps=1000),
                      optax.GradientTransformation)


@pytest.mark.parametrize('key, value', [
    ('name', 'sgd'),
    ('lr', 0.0),
    ('lr', -1.0),
    ('lr', 'fast'),
    ('weight_decay', -0.1),
    ('b1', 1.0),
    ('b2', -0.5),
    ('eps', 0.0),
    ('schedule', 'linear'),
    ('warmup_steps', -1),
    ('warmup_steps', 1.5),
    ('min_lr_ratio', 1.5),
    ('decay_fraction', 0.0),
    ('clip_norm', -1.0),
    ('no_decay', ('(unclosed',)),
    ('muon.momentum', 1.0),
    ('muon.nesterov', 'yes'),
    ('muon.ns_steps', 0),
    ('muon.ns_steps', 2.0),
    ('muon.ns_coeffs', 'dion'),
    ('muon.ns_dtype', 'float16'),
    ('muon.ns_eps', -1e-7),
    ('muon.shape_scaling', 'mup'),
    ('muon.rms_scale', 0.0),
    ('muon.variant', 'adamuon'),
    ('muon.normuon_b2', 1.0),
    ('muon.adam_lr', -3e-4),
    ('muon.adam_weight_decay', -1.0),
    ('muon.hidden', (('blocks/attn/wq', 'bxo'),)),
    ('muon.hidden', (('blocks/(attn', 'bio'),)),
    ('muon.shard_axis', 'data,'),
])
def test_validation_names_the_key(key, value):
  # Rebuilt from a dict, as a config file could write it: no ConfigDict type checks on the way.
  raw = optim.default_config().to_dict()
  section = raw['muon'] if key.startswith('muon.') else raw
  section[key.split('.')[-1]] = value
  cfg = ml_collections.ConfigDict(raw)
  with pytest.raises(UserError, match=f'optimizer.{key}'.replace('.', r'\.')):
    optim.validate_config(cfg)


def test_unknown_keys_are_rejected():
  cfg = optim.default_config()
  with cfg.unlocked():
    cfg.learning_rate = 1e-3
  with pytest.raises(UserError, match=r'optimizer\.learning_rate'):
    optim.validate_config(cfg)
  cfg = optim.default_config()
  with cfg.muon.unlocked():
    cfg.muon.ns_iters = 5
  with pytest.raises(UserError, match=r'optimizer\.muon\.ns_iters'):
    optim.validate_config(cfg)


def test_build_rejects_warmup_longer_than_the_run():
  with pytest.raises(UserError, match=r'optimizer\.warmup_steps'):
    optim.build_optimizer(cfg_with(warmup_steps=200), total_steps=100)
  with pytest.raises(UserError, match=r'train\.steps'):
    optim.build_optimizer(cfg_with(), total_steps=0)


def values(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


def test_cosine_schedule():
  cfg = cfg_with(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule='cosine')
  sched = optim.lr_schedule(cfg, total_steps=110)
  np.testing.assert_allclose(values(sched, [0, 4, 9, 10, 60, 110, 200]),
                             [1e-4, 5e-4, 1e-3, 1e-3, 0.55e-3, 1e-4, 1e-4], rtol=1e-5)


def test_wsd_schedule():
  cfg = cfg_with(lr=1e-3, warmup_steps=10, min_lr_ratio=0.0, schedule='wsd', decay_fraction=0.2)
  sched = optim.lr_schedule(cfg, total_steps=100)  # stable until step 80, then linear to 0 at 100
  np.testing.assert_allclose(values(sched, [0, 9, 50, 80, 90, 100]),
                             [1e-4, 1e-3, 1e-3, 1e-3, 0.5e-3, 0.0], rtol=1e-5, atol=1e-12)


def test_constant_schedule_and_jit():
  cfg = cfg_with(lr=2e-3, warmup_steps=4, schedule='constant')
  sched = optim.lr_schedule(cfg, total_steps=50)
  np.testing.assert_allclose(values(sched, [0, 3, 4, 49]), [5e-4, 2e-3, 2e-3, 2e-3], rtol=1e-6)
  assert float(jax.jit(sched)(jnp.int32(1))) == pytest.approx(1e-3)
  no_warmup = optim.lr_schedule(cfg_with(lr=2e-3, warmup_steps=0, schedule='constant'), 50)
  assert float(no_warmup(0)) == pytest.approx(2e-3)


def test_schedule_scales_both_muon_and_adamw_groups():
  cfg = cfg_with(name='muon', lr=1e-2, warmup_steps=0, schedule='wsd', decay_fraction=0.5,
                 min_lr_ratio=0.0, clip_norm=0.0, weight_decay=0.0)
  cfg.muon.adam_lr = 1e-3
  params = {'blocks': {'mlp': {'w_up': jnp.ones((1, 8, 16))}},
            'embed': {'embedding': jnp.ones((4, 8))}}
  grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).standard_normal(p.shape),
                                             jnp.float32), params)
  opt = optim.build_optimizer(cfg, total_steps=10)
  update = jax.jit(opt.update)
  state = opt.init(params)
  rms = []
  for _ in range(10):
    updates, state = update(grads, state, params)
    rms.append(optim.group_update_rms(updates, cfg))
  # Step 0: Muon at 0.2 * lr (RMS matched), AdamW's first step is sign-like at adam_lr.
  assert float(rms[0]['update_rms_muon']) == pytest.approx(0.2 * 1e-2, rel=0.2)
  assert float(rms[0]['update_rms_adamw']) == pytest.approx(1e-3, rel=1e-3)
  # Step 7 of 10 is 2/5 into the decay: both groups at 0.6 of their own peak.
  assert float(rms[7]['update_rms_adamw']) == pytest.approx(0.6e-3, rel=1e-3)
  ratio = float(rms[7]['update_rms_muon'] / rms[0]['update_rms_muon'])
  assert ratio == pytest.approx(0.6, rel=0.05)


def test_adamw_baseline_clips_and_masks_decay():
  cfg = cfg_with(lr=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.5, clip_norm=1.0)
  params = {'w': jnp.ones((4, 4)), 'norm': {'scale': jnp.ones((4,))}, 'bias': jnp.ones((4,))}
  opt = optim.build_optimizer(cfg, total_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  np.testing.assert_allclose(updates['w'], -1e-2 * 0.5 * np.ones((4, 4)), rtol=1e-6)
  assert np.all(updates['norm']['scale'] == 0) and np.all(updates['bias'] == 0)
  # Clipping happens before AdamW: its first moment sees a gradient of global norm clip_norm.
  big = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
  _, state = opt.update(big, opt.init(params), params)
  mu = optax.tree_utils.tree_get(state, 'mu')
  assert float(optax.tree.norm(mu)) == pytest.approx((1 - cfg.b1) * 1.0, rel=1e-5)
