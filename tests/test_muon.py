"""Muon: Newton-Schulz numerics, equivalence with a plain reference, stacked/4-D layouts, routing
of real model sizes, NorMuon, and the FSDP split of the orthogonalisation (8 CPU devices)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import optim
from jaxtrain.errors import UserError
from jaxtrain.optim.muon import NS_BAND, NS_BAND_MIN_RELATIVE_SIGMA, ns_coefficients

REPO = pathlib.Path(__file__).resolve().parents[1]
BF16_SLACK = 0.08  # bf16 rounding widens the fp32 band by at most this much on these matrices


def param_shapes(D, L, N, K, H, F, V, tied=False):
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  tree = {
      'embed': {'embedding': s(V, D)},
      'blocks': {
          'attn_norm': {'scale': s(L, D)},
          'mlp_norm': {'scale': s(L, D)},
          'attn': {'wq': s(L, D, N, H), 'wk': s(L, D, K, H), 'wv': s(L, D, K, H),
                   'wo': s(L, N, H, D)},
          'mlp': {'w_gate': s(L, D, F), 'w_up': s(L, D, F), 'w_down': s(L, F, D)},
      },
      'final_norm': {'scale': s(D)},
  }
  if not tied:
    tree['lm_head'] = {'kernel': s(D, V)}
  return tree


def normal(shape, seed=0):
  # numpy, not jax.random: compiling threefry costs seconds on a busy 2-core CPU.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def materialise(shapes, seed=0):
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(treedef, [normal(x.shape, seed + k) for k, x in enumerate(leaves)])


def muon_cfg(**muon_overrides):
  cfg = optim.default_config()
  cfg.name = 'muon'
  for k, v in muon_overrides.items():
    cfg.muon[k] = v
  return cfg


def sample_matrices(m, n, rng):
  r = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, r)))
  v, _ = np.linalg.qr(rng.standard_normal((n, r)))
  return {
      'random': rng.standard_normal((m, n)),
      'ill_conditioned': (u * np.geomspace(1.0, 1e-2, r)) @ v.T,  # condition number 100
      'rank_deficient': (u * np.where(np.arange(r) < 5, rng.uniform(0.5, 2.0, r), 0.0)) @ v.T,
  }


# --- Newton-Schulz -------------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(32, 48), (48, 32)], ids=['wide', 'tall'])
@pytest.mark.parametrize('ns_dtype', [jnp.float32, jnp.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('preset', ['standard', 'polar_express'])
def test_ns_singular_values_in_documented_band(preset, ns_dtype, shape):
  lo, hi = NS_BAND[preset]
  if ns_dtype == jnp.bfloat16:
    lo, hi = lo - BF16_SLACK, hi + BF16_SLACK
  for kind, x in sample_matrices(*shape, np.random.default_rng(0)).items():
    s_in = np.linalg.svd(x, compute_uv=False)
    nonzero = s_in > 1e-6 * s_in.max()
    assert s_in[nonzero].min() >= NS_BAND_MIN_RELATIVE_SIGMA * np.linalg.norm(x)  # test premise
    y = optim.orthogonalize(jnp.asarray(x, jnp.float32), preset, 5, ns_dtype=ns_dtype)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    s_out = np.linalg.svd(np.asarray(y), compute_uv=False)
    assert lo <= s_out[nonzero].min() and s_out[nonzero].max() <= hi, (kind, s_out[nonzero])
    if ns_dtype == jnp.float32:  # odd polynomials keep the null space empty (bf16 noise fills it)
      assert np.all(s_out[~nonzero] < 1e-3), kind


def test_ns_of_zero_matrix_is_zero_not_nan():
  y = jax.jit(optim.orthogonalize)(jnp.zeros((2, 8, 4)))
  assert np.all(np.asarray(y) == 0.0)


def test_coefficient_rows_follow_steps():
  rows, prescale = ns_coefficients('standard', 7)
  assert rows.shape == (7, 3) and prescale == 1.0 and np.all(rows == rows[0])
  pe8, prescale = ns_coefficients('polar_express', 8)
  assert prescale == 1.01 and pe8.shape == (8, 3)
  np.testing.assert_allclose(pe8[0], (8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3,
                                      17.300387312530933 / 1.01**5))
  np.testing.assert_array_equal(pe8[-1], (1.875, -1.25, 0.375))  # last row is not pre-scaled
  np.testing.assert_array_equal(ns_coefficients('polar_express', 3)[0], pe8[:3])  # prefix
  pe11 = ns_coefficients('polar_express', 11)[0]
  np.testing.assert_array_equal(pe11[8:], np.tile(pe8[-1], (3, 1)))  # then the converged row
  custom = [(3.0, -3.0, 1.0), (2.0, -1.5, 0.5)]
  np.testing.assert_array_equal(ns_coefficients(custom, 2)[0], custom)
  for bad_rows, steps in [(custom, 5), (custom, 1), ([(1.0, 2.0)], 5)]:
    with pytest.raises(ValueError):
      ns_coefficients(bad_rows, steps)
  for steps in (0, -1, 2.5):
    with pytest.raises(ValueError):
      ns_coefficients('standard', steps)


def test_ns_loop_is_a_scan_not_unrolled():
  x = jnp.ones((2, 8, 16))
  for steps in (3, 9):
    jaxpr = str(jax.make_jaxpr(lambda x: optim.orthogonalize(x, 'polar_express', steps))(x))
    assert jaxpr.count('dot_general') == 3  # one loop body, whatever the step count
    assert f'length={steps}' in jaxpr


# --- Equivalence with a plain Muon ---------------------------------------------------------------


def reference_muon(w, grads, lr, wd, beta=0.95, ns_steps=5):
  """Muon written out plainly for one 2-D matrix, Jordan's recipe with Moonlight RMS matching."""
  a, b, c = 3.4445, -4.7750, 2.0315
  w, buf = np.array(w, np.float64), np.zeros_like(w, np.float64)
  for g in grads:
    buf = beta * buf + (1 - beta) * g
    x = (1 - beta) * g + beta * buf  # Nesterov
    transpose = x.shape[0] > x.shape[1]
    if transpose:
      x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(ns_steps):
      gram = x @ x.T
      x = a * x + (b * gram + c * gram @ gram) @ x
    if transpose:
      x = x.T
    update = 0.2 * np.sqrt(max(w.shape)) * x
    w = w - lr * (update + wd * w)
  return w


@pytest.mark.parametrize('shape', [(24, 40), (40, 24)])
def test_matches_reference_muon_on_a_matrix(shape):
  rng = np.random.default_rng(1)
  w0 = rng.standard_normal(shape).astype(np.float32)
  grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
  lr, wd = 0.01, 0.1
  opt = optax.chain(optim.scale_by_muon(), optax.add_decayed_weights(wd),
                    optax.scale_by_learning_rate(lr))
  params = {'w': jnp.asarray(w0)}
  state = opt.init(params)
  for g in grads:
    updates, state = jax.jit(opt.update)({'w': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params['w'], reference_muon(w0, grads, lr, wd), atol=2e-5)


def test_stacked_matrices_equal_separate_calls():
  x = normal((4, 12, 20), 0)
  ortho = jax.jit(lambda x: optim.orthogonalize(x, 'polar_express'))
  stacked = ortho(x)
  for l in range(4):
    np.testing.assert_allclose(stacked[l], ortho(x[l]), atol=1e-5)

  g = normal((4, 20, 12), 1)  # tall, through the optimizer
  opt = optim.scale_by_muon()
  update = jax.jit(opt.update)
  stacked, _ = update({'w': g}, opt.init({'w': g}))
  for l in range(4):
    single, _ = update({'w': g[l]}, opt.init({'w': g[l]}))
    np.testing.assert_allclose(stacked['w'][l], single['w'], atol=1e-6)


def test_attention_kernels_are_orthogonalised_as_their_2d_matrices():
  L, D, N, H = 2, 16, 4, 8
  wq = normal((L, D, N, H), 0)
  wo = normal((L, N, H, D), 1)
  opt = optim.scale_by_muon(layouts={'wq': 'bioo', 'wo': 'biio'}, shape_scaling='none')
  out, _ = jax.jit(opt.update)({'wq': wq, 'wo': wo}, opt.init({'wq': wq, 'wo': wo}))
  flat = optim.scale_by_muon(shape_scaling='none')  # default: last two axes
  ref = {'wq': wq.reshape(L, D, N * H), 'wo': wo.reshape(L, N * H, D)}
  ref_out, _ = jax.jit(flat.update)(ref, flat.init(ref))
  np.testing.assert_allclose(out['wq'].reshape(L, D, N * H), ref_out['wq'], atol=1e-6)
  np.testing.assert_allclose(out['wo'].reshape(L, N * H, D), ref_out['wo'], atol=1e-6)
  # Orthogonalised as the (D, N*H) matrix, not per head: all D singular values in the band.
  s = np.linalg.svd(np.asarray(out['wq'][0]).reshape(D, N * H), compute_uv=False)
  assert len(s) == D and NS_BAND['standard'][0] <= s.min() and s.max() <= NS_BAND['standard'][1]


def test_grouped_and_ungrouped_give_the_same_updates():
  blocks = materialise(param_shapes(D=16, L=3, N=2, K=1, H=8, F=24, V=32), seed=1)['blocks']
  grads = {'attn': blocks['attn'], 'mlp': blocks['mlp']}
  layouts = lambda path, shape: optim.routing.hidden_layout(
      'blocks/' + path, optim.DEFAULT_HIDDEN)
  out = {}
  for group in (True, False):
    opt = optim.scale_by_muon(layouts=layouts, group_by_shape=group)
    out[group], _ = jax.jit(opt.update)(grads, opt.init(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out[True], out[False])


# --- Shape scaling, state, variant ---------------------------------------------------------------


def test_shape_scaling_values():
  assert optim.shape_scale(512, 1408, 'spectral') == pytest.approx(np.sqrt(1408 / 512))
  assert optim.shape_scale(1408, 512, 'spectral') == 1.0
  assert optim.shape_scale(1408, 512, 'rms_match') == pytest.approx(0.2 * np.sqrt(1408))
  g = normal((64, 256), 0)
  opt = optim.scale_by_muon(ns_coeffs='polar_express', ns_steps=8)  # ~exactly orthogonal
  u, _ = jax.jit(opt.update)({'w': g}, opt.init({'w': g}))
  assert float(jnp.sqrt(jnp.mean(u['w']**2))) == pytest.approx(0.2, rel=0.03)  # matches AdamW


def test_momentum_is_fp32_for_bf16_params():
  params = {'w': jnp.ones((2, 4, 6), jnp.bfloat16)}
  opt = optim.scale_by_muon(variant='normuon')
  state = opt.init(params)
  assert state.mu['w'].dtype == jnp.float32 and state.nu['w'].shape == (2, 6)
  updates, state = jax.jit(opt.update)(params, state)
  assert updates['w'].dtype == jnp.bfloat16 and state.mu['w'].dtype == jnp.float32


def test_normuon_is_scale_invariant_and_keeps_the_ns_norm():
  g = normal((3, 16, 24), 0) * jnp.linspace(0.1, 3.0, 24)
  nor = optim.scale_by_muon(variant='normuon', shape_scaling='none')
  plain = optim.scale_by_muon(shape_scaling='none')
  u1, s1 = jax.jit(nor.update)({'w': g}, nor.init({'w': g}))
  u2, _ = jax.jit(nor.update)({'w': 1e3 * g}, nor.init({'w': g}))
  np.testing.assert_allclose(u1['w'], u2['w'], atol=1e-5)
  ref, _ = jax.jit(plain.update)({'w': g}, plain.init({'w': g}))
  np.testing.assert_allclose(jnp.linalg.norm(u1['w'], axis=(1, 2)),
                             jnp.linalg.norm(ref['w'], axis=(1, 2)), rtol=1e-5)
  assert not np.allclose(u1['w'], ref['w'])  # it does change the direction
  # After normalisation the output neurons (columns) have equal RMS on the first step.
  col_rms = jnp.sqrt(jnp.mean(u1['w']**2, axis=1))
  np.testing.assert_allclose(col_rms / col_rms.mean(axis=-1, keepdims=True), 1.0, rtol=1e-4)
  assert s1.nu['w'].shape == (3, 24)


# --- Routing -------------------------------------------------------------------------------------

SIZES = {
    '35m': dict(D=512, L=8, N=8, K=8, H=64, F=1408, V=8192),
    '1.4b': dict(D=2048, L=24, N=16, K=16, H=128, F=5888, V=32000),
}
HIDDEN = {'blocks/attn/wq', 'blocks/attn/wk', 'blocks/attn/wv', 'blocks/attn/wo',
          'blocks/mlp/w_gate', 'blocks/mlp/w_up', 'blocks/mlp/w_down'}


@pytest.mark.parametrize('size', SIZES)
def test_routing_of_real_model_sizes(size):
  shapes = param_shapes(**SIZES[size])
  table = optim.routing_table(shapes, muon_cfg())
  groups = {path: group for path, _, group in table}
  assert {p for p, g in groups.items() if g == 'muon'} == HIDDEN
  for path in ('embed/embedding', 'lm_head/kernel', 'final_norm/scale', 'blocks/attn_norm/scale',
               'blocks/mlp_norm/scale'):
    assert groups[path] == 'adamw'
  text = optim.format_routing_table(table)
  assert 'blocks/attn/wq' in text and 'muon: 7 tensors' in text and 'adamw: 5 tensors' in text
  # The whole optimizer initialises and updates on the abstract tree (no memory, no compile).
  opt = optim.build_optimizer(muon_cfg(), total_steps=100)
  state = jax.eval_shape(opt.init, shapes)
  updates, _ = jax.eval_shape(opt.update, shapes, state, shapes)
  assert jax.tree.map(lambda u: u.shape, updates) == jax.tree.map(lambda p: p.shape, shapes)


def test_routing_sends_biases_to_adamw_without_decay():
  params = {'blocks': {'attn': {'wq': jnp.ones((2, 8, 2, 4)), 'bias': jnp.ones((2, 8))}},
            'final_norm': {'scale': jnp.ones((8,))}, 'embed': {'embedding': jnp.ones((16, 8))}}
  groups = {p: g for p, _, g in optim.routing_table(params, muon_cfg())}
  assert groups == {'blocks/attn/wq': 'muon', 'blocks/attn/bias': 'adamw',
                    'final_norm/scale': 'adamw', 'embed/embedding': 'adamw'}
  cfg = muon_cfg()
  cfg.weight_decay, cfg.clip_norm, cfg.warmup_steps = 0.5, 0.0, 0
  opt = optim.build_optimizer(cfg, total_steps=100)
  zeros = jax.tree.map(jnp.zeros_like, params)
  # Zero gradients: only weight decay moves parameters.
  updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
  assert np.all(updates['blocks']['attn']['bias'] == 0)
  assert np.all(updates['final_norm']['scale'] == 0)
  assert np.all(updates['embed']['embedding'] < 0) and np.all(updates['blocks']['attn']['wq'] < 0)


def test_routing_rejects_a_layout_that_does_not_fit():
  cfg = muon_cfg(hidden=((r'blocks/attn/wq', 'bio'),))
  with pytest.raises(UserError, match='optimizer.muon.hidden'):
    optim.routing_table({'blocks': {'attn': {'wq': jnp.ones((2, 8, 2, 4))}}}, cfg)


def test_group_update_rms():
  updates = {'blocks': {'mlp': {'w_up': jnp.full((2, 4, 6), 3.0)}},
             'final_norm': {'scale': jnp.full((4,), 2.0)},
             'embed': {'embedding': jnp.zeros((4, 4))}}
  rms = jax.jit(lambda u: optim.group_update_rms(u, muon_cfg()))(updates)
  assert float(rms['update_rms_muon']) == pytest.approx(3.0)
  assert float(rms['update_rms_adamw']) == pytest.approx(np.sqrt(4 * 4.0 / 20))
  assert set(optim.group_update_rms(updates, optim.default_config())) == {'update_rms_adamw'}


# --- FSDP split of Newton-Schulz -----------------------------------------------------------------

SHARDED_SCRIPT = textwrap.dedent('''
    import re, sys, jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jaxtrain import optim
    from tests.test_muon import materialise, muon_cfg, param_shapes
    assert jax.device_count() == 8
    def dot_shapes(hlo):
      shapes = re.findall(r'f32\\[([\\d,]+)\\]\\S* dot\\(', hlo)
      return [tuple(map(int, d.split(','))) for d in shapes]
    L = 8
    shapes = param_shapes(D=16, L=L, N=2, K=1, H=8, F=24, V=32)
    host_params, host_grads = materialise(shapes), materialise(shapes, seed=1)
    # Reference: one device, no mesh.
    reference = {}
    for variant in ('muon', 'normuon'):
      opt = optim.build_optimizer(muon_cfg(variant=variant), total_steps=100)
      state = opt.init(host_params)
      step = jax.jit(opt.update)
      for _ in range(2):  # second step: momentum and NorMuon state in play
        u, state = step(host_grads, state, host_params)
      reference[variant] = u
    for axis_type in (AxisType.Explicit, AxisType.Auto):
      mesh = jax.make_mesh((1, 8), ('data', 'fsdp'), axis_types=(axis_type,) * 2)
      # FSDP-style parameter sharding: the model axis (axis 1, not L) is split where it divides.
      spec = lambda x: P(None, 'fsdp') if x.ndim >= 2 and x.shape[1] % 8 == 0 else P()
      shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), host_params)
      params = jax.device_put(host_params, shardings)
      grads = jax.device_put(host_grads, shardings)
      for variant in ('muon', 'normuon') if axis_type == AxisType.Explicit else ('muon',):
        opt = optim.build_optimizer(muon_cfg(variant=variant), total_steps=100, mesh=mesh,
                                    param_shardings=shardings)
        state = opt.init(params)
        step = jax.jit(opt.update).lower(grads, state, params).compile()
        for _ in range(2):
          u, state = step(grads, state, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6),
                     u, reference[variant])
        for x, s in zip(jax.tree.leaves(u), jax.tree.leaves(shardings)):
          assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)
        # Every NS matmul runs on this device's share of its shape group: 16 or 24 matrices of one
        # shape (layers x roles) over 8 devices, 2 or 3 each.
        dots = dot_shapes(step.as_text())
        assert dots and {d[0] for d in dots} == {2, 3}, (axis_type, variant, dots)
    # scale_by_muon alone, grouped by shape, split over every device.
    hidden = lambda t: {'attn': t['blocks']['attn'], 'mlp': t['blocks']['mlp']}
    layouts = lambda path, _: optim.routing.hidden_layout('blocks/' + path, optim.DEFAULT_HIDDEN)
    out = {}
    for name, m, g in (('ref', None, hidden(host_grads)), ('sharded', mesh, hidden(grads))):
      tx = optim.scale_by_muon(layouts=layouts, group_by_shape=True, mesh=m)
      step = jax.jit(tx.update).lower(g, tx.init(g)).compile()
      out[name] = step(g, tx.init(g))[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6),
                 out['sharded'], out['ref'])
    # Groups of 2 or 3 matrices per layer, (16|24, m, n) in all, over 8 devices.
    assert sorted({d[0] for d in dot_shapes(step.as_text())}) == [2, 3]
    print('OK')
''')


def test_sharded_newton_schulz_equals_unsharded_on_8_devices():
  # LLVM optimisation off: compiles ~3x faster and both sides of the comparison share it.
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             '--xla_backend_optimization_level=0',
             PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
  proc = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'OK' in proc.stdout
