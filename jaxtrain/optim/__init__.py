"""The optimizer from config: AdamW baseline or Muon (hidden matrices) + AdamW (everything else).

`default_config()` is the `optimizer` section of a jaxtrain config; `validate_config` checks it
before anything compiles; `build_optimizer` turns it into one optax GradientTransformation:

  clip_by_global_norm(clip_norm)  ->  adamw                                  (name='adamw')
  clip_by_global_norm(clip_norm)  ->  partition(muon: scale_by_muon -> decay -> lr,
                                                adamw: adamw)                (name='muon')

`muon` and `scale_by_muon` are plain optax transforms, usable without jaxtrain configs.
"""

import re

import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

from jaxtrain.errors import UserError
from jaxtrain.optim import hyperball as hyperball_lib
from jaxtrain.optim import routing
from jaxtrain.optim import schedules
from jaxtrain.optim.qk_clip import clip_qk
from jaxtrain.optim.muon import (MuonState, NS_BAND, NS_METHODS, NS_PRESETS, muon, ns_coefficients,
                                 ns_flops, orthogonalize, scale_by_muon, shape_scale, uses_gram)
from jaxtrain.optim.routing import (DEFAULT_HIDDEN, DEFAULT_NO_DECAY, format_routing_table,
                                    group_update_rms, routing_table)

__all__ = [
    'DEFAULT_HIDDEN', 'DEFAULT_NO_DECAY', 'MuonState', 'NS_BAND', 'NS_PRESETS', 'build_optimizer',
    'clip_qk',
    'default_config', 'format_routing_table', 'group_update_rms', 'lr_schedule', 'muon',
    'ns_coefficients', 'ns_flops', 'orthogonalize', 'routing_table', 'scale_by_muon',
    'shape_scale', 'uses_gram', 'validate_config',
]

NAMES = ('adamw', 'muon')
NS_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def default_config() -> ml_collections.ConfigDict:
  """Every optimizer key with a default that trains the CPU quickstart sensibly."""
  c = ml_collections.ConfigDict()
  c.name = 'adamw'  # 'adamw' | 'muon'
  c.lr = 3e-4  # peak lr; for name='muon' the Muon group's lr (rms_match lets it equal AdamW's)
  c.weight_decay = 0.1  # decoupled, multiplied by the lr (optax/PyTorch convention)
  c.b1 = 0.9  # AdamW betas/eps (the baseline, and the AdamW group under Muon)
  c.b2 = 0.95  # AdamW second-moment decay
  c.eps = 1e-8  # AdamW epsilon
  c.no_decay = DEFAULT_NO_DECAY  # path regexes without weight decay
  c.schedule = 'cosine'  # 'cosine' | 'wsd' | 'constant', all after linear warm-up
  c.warmup_steps = 100  # step s < warmup_steps gets (s+1)/warmup_steps of the peak; <= train.steps
  c.min_lr_ratio = 0.1  # final lr / peak lr (cosine, wsd)
  c.decay_fraction = 0.2  # wsd: the last fraction of steps, decaying linearly to min_lr_ratio
  c.clip_norm = 1.0  # global-norm gradient clipping; 0 = off
  # Hyperball (arXiv:2606.16899): the matrices of muon.hidden (under adamw too: AdamH; muon:
  # MuonH) keep their init Frobenius norm, updates have norm lr x that norm (lr is an angle, in
  # radians, roughly) and get no weight decay.
  c.hyperball = False
  # QK-clip (Kimi K2's MuonClip, arXiv:2507.20534): after each update, heads whose max attention
  # logit in the step's batch exceeded this get W_q, W_k scaled down by sqrt(tau / max); 0 = off.
  c.qk_clip_tau = 0.0

  c.muon = ml_collections.ConfigDict()
  c.muon.momentum = 0.95  # momentum beta of the Muon group
  c.muon.nesterov = True  # Nesterov momentum
  c.muon.ns_steps = 5  # Newton-Schulz iterations
  c.muon.ns_coeffs = 'standard'  # 'standard' | 'polar_express'
  # 'standard' | 'gram': Gram Newton-Schulz (iterates on X X^T; dao-lab 2026) on the wide
  # matrices where it needs fewer FLOPs; same result within rounding.
  c.muon.ns_method = 'standard'
  c.muon.gram_restart = 2  # gram: recompute X X^T from X once, after this many NS steps (0 = never)
  c.muon.ns_dtype = 'float32'  # 'float32' | 'bfloat16' (NS loop only; state and I/O are fp32)
  c.muon.ns_eps = 1e-7  # added to the Frobenius norm before dividing by it
  c.muon.shape_scaling = 'rms_match'  # 'rms_match' | 'spectral' | 'none'
  c.muon.rms_scale = 0.2  # update RMS that rms_match aims for
  c.muon.variant = 'muon'  # 'muon' | 'normuon'
  c.muon.normuon_b2 = 0.95  # normuon: EMA decay of the per-neuron mean square
  c.muon.adam_lr = config_dict.placeholder(float)  # AdamW-group lr; None = optimizer.lr
  c.muon.adam_weight_decay = config_dict.placeholder(float)  # None = optimizer.weight_decay
  c.muon.hidden = DEFAULT_HIDDEN  # (regex, layout) rows routed to Muon; see routing.py
  # Mesh axes whose devices share the Newton-Schulz work (each device its own matrices).
  c.muon.shard_axis = 'data,fsdp,tensor'
  return c


def _unknown_keys(cfg, ref, prefix):
  for key in cfg.keys():
    if key not in ref:
      raise UserError(f'{prefix}.{key} is not an optimizer key; known: {", ".join(ref.keys())}')
    if isinstance(ref[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], (dict, ml_collections.ConfigDict)):
        raise UserError(f'{prefix}.{key} must be a section, got {cfg[key]!r}')
      _unknown_keys(cfg[key], ref[key], f'{prefix}.{key}')


def _number(value, key, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
  ok_type = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, ok_type):
    raise UserError(f'{key} must be {"an integer" if integer else "a number"}, got {value!r}')
  if lo is not None and (value <= lo if lo_open else value < lo):
    raise UserError(f'{key} must be {">" if lo_open else ">="} {lo}, got {value}')
  if hi is not None and (value >= hi if hi_open else value > hi):
    raise UserError(f'{key} must be {"<" if hi_open else "<="} {hi}, got {value}')


def _choice(value, key, choices):
  if value not in choices:
    raise UserError(f'{key} must be one of {", ".join(choices)}, got {value!r}')


def _regexes(patterns, key):
  if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
    raise UserError(f'{key} must be a tuple of regex strings, got {patterns!r}')
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise UserError(f'{key}: bad regex {p!r}: {e}') from None


def validate_config(opt_cfg) -> None:
  """Raises UserError naming the first bad `optimizer.*` key; cheap, so call it before compiling."""
  p = 'optimizer'
  _unknown_keys(opt_cfg, default_config(), p)
  _choice(opt_cfg.name, f'{p}.name', NAMES)
  _number(opt_cfg.lr, f'{p}.lr', lo=0, lo_open=True)
  _number(opt_cfg.weight_decay, f'{p}.weight_decay', lo=0)
  _number(opt_cfg.b1, f'{p}.b1', lo=0, hi=1, hi_open=True)
  _number(opt_cfg.b2, f'{p}.b2', lo=0, hi=1, hi_open=True)
  _number(opt_cfg.eps, f'{p}.eps', lo=0, lo_open=True)
  _regexes(opt_cfg.no_decay, f'{p}.no_decay')
  _choice(opt_cfg.schedule, f'{p}.schedule', schedules.SCHEDULES)
  _number(opt_cfg.warmup_steps, f'{p}.warmup_steps', lo=0, integer=True)
  _number(opt_cfg.min_lr_ratio, f'{p}.min_lr_ratio', lo=0, hi=1)
  _number(opt_cfg.decay_fraction, f'{p}.decay_fraction', lo=0, hi=1, lo_open=True)
  _number(opt_cfg.clip_norm, f'{p}.clip_norm', lo=0)
  if not isinstance(opt_cfg.hyperball, bool):
    raise UserError(f'{p}.hyperball must be True or False, got {opt_cfg.hyperball!r}')
  _number(opt_cfg.qk_clip_tau, f'{p}.qk_clip_tau', lo=0)

  m, p = opt_cfg.muon, 'optimizer.muon'
  _number(m.momentum, f'{p}.momentum', lo=0, hi=1, hi_open=True)
  if not isinstance(m.nesterov, bool):
    raise UserError(f'{p}.nesterov must be True or False, got {m.nesterov!r}')
  _number(m.ns_steps, f'{p}.ns_steps', lo=1, hi=100, integer=True)
  _choice(m.ns_coeffs, f'{p}.ns_coeffs', tuple(NS_PRESETS))
  _choice(m.ns_dtype, f'{p}.ns_dtype', tuple(NS_DTYPES))
  _choice(m.ns_method, f'{p}.ns_method', NS_METHODS)
  _number(m.gram_restart, f'{p}.gram_restart', lo=0, integer=True)
  _number(m.ns_eps, f'{p}.ns_eps', lo=0, lo_open=True)
  _choice(m.shape_scaling, f'{p}.shape_scaling', ('rms_match', 'spectral', 'none'))
  _number(m.rms_scale, f'{p}.rms_scale', lo=0, lo_open=True)
  _choice(m.variant, f'{p}.variant', ('muon', 'normuon'))
  _number(m.normuon_b2, f'{p}.normuon_b2', lo=0, hi=1, hi_open=True)
  if m.adam_lr is not None:
    _number(m.adam_lr, f'{p}.adam_lr', lo=0, lo_open=True)
  if m.adam_weight_decay is not None:
    _number(m.adam_weight_decay, f'{p}.adam_weight_decay', lo=0)
  if not isinstance(m.hidden, (list, tuple)) or not all(
      isinstance(row, (list, tuple)) and len(row) == 2 for row in m.hidden):
    raise UserError(f'{p}.hidden must be (regex, layout) pairs, got {m.hidden!r}')
  _regexes([row[0] for row in m.hidden], f'{p}.hidden')
  for regex, layout in m.hidden:
    if (not isinstance(layout, str) or set(layout) - set('bio') or 'i' not in layout
        or 'o' not in layout):
      raise UserError(f"{p}.hidden: layout {layout!r} of {regex!r} must use only 'b', 'i', 'o' "
                      "with at least one 'i' and one 'o'")
  if not isinstance(m.shard_axis, str) or not all(_shard_axes(m.shard_axis)):
    raise UserError(f"{p}.shard_axis must be a mesh axis name or names like 'data,fsdp', "
                    f'got {m.shard_axis!r}')


def _shard_axes(text):
  return tuple(a.strip() for a in text.split(','))


def lr_schedule(opt_cfg, total_steps: int):
  """Peak `optimizer.lr` times the schedule multiplier: the lr to log, and the Muon/AdamW lr."""
  mult = _multiplier(opt_cfg, total_steps)
  return lambda step: opt_cfg.lr * mult(step)


def _multiplier(opt_cfg, total_steps):
  return schedules.lr_multiplier(opt_cfg.schedule, total_steps, opt_cfg.warmup_steps,
                                 opt_cfg.min_lr_ratio, opt_cfg.decay_fraction)


def build_optimizer(opt_cfg, total_steps: int, mesh=None, param_shardings=None,
                    unroll_ns=False) -> optax.GradientTransformation:
  """The optimizer that `optimizer.*` describes, for a run of `total_steps` optimizer steps.

  Args:
    opt_cfg: the `optimizer` config section (validated here too).
    total_steps: length of the run, which the schedules decay over.
    mesh: the training mesh; with name='muon' Newton-Schulz work is split over the devices of
      `optimizer.muon.shard_axis` (axes missing from the mesh are ignored).
    param_shardings: optional pytree of the params' NamedShardings; Muon updates are constrained
      back to them after the split Newton-Schulz.
  """
  validate_config(opt_cfg)
  if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
    raise UserError(f'train.steps must be an integer >= 1, got {total_steps!r}')
  if opt_cfg.warmup_steps > total_steps:
    raise UserError(f'optimizer.warmup_steps ({opt_cfg.warmup_steps}) must be <= train.steps '
                    f'({total_steps})')
  mult = _multiplier(opt_cfg, total_steps)
  lr = lambda step: opt_cfg.lr * mult(step)
  decay_mask = routing.decay_mask_fn(tuple(opt_cfg.no_decay))
  clip = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
  m = opt_cfg.muon
  if opt_cfg.name == 'adamw':
    adamw = optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                        weight_decay=opt_cfg.weight_decay, mask=decay_mask)
    if not opt_cfg.hyperball:
      return optax.chain(*clip, adamw)
    # AdamH: Adam's direction on the hidden matrices, on their spheres; AdamW elsewhere.
    hidden = tuple(tuple(row) for row in m.hidden)
    layout_fn = lambda path, shape: routing.hidden_layout(path, hidden)
    labels = lambda params: routing.map_with_path(
        lambda p, _: routing.MUON if routing.hidden_layout(p, hidden) else routing.ADAMW, params)
    adam = optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
    return optax.chain(*clip, optax.partition(
        {routing.MUON: hyperball_lib.hyperball(adam, lr, layout_fn), routing.ADAMW: adamw},
        labels))

  adam_peak = opt_cfg.lr if m.adam_lr is None else m.adam_lr
  shard_axis = None
  if mesh is not None:
    shard_axis = tuple(a for a in _shard_axes(m.shard_axis) if a in mesh.axis_names)
    if not shard_axis:
      mesh = None
  return optax.chain(*clip, muon(
      lr,
      adam_learning_rate=lambda step: adam_peak * mult(step),
      weight_decay=opt_cfg.weight_decay,
      adam_weight_decay=m.adam_weight_decay,
      adam_b1=opt_cfg.b1,
      adam_b2=opt_cfg.b2,
      adam_eps=opt_cfg.eps,
      hidden=tuple(tuple(row) for row in m.hidden),
      no_decay=tuple(opt_cfg.no_decay),
      momentum=m.momentum,
      nesterov=m.nesterov,
      ns_coeffs=m.ns_coeffs,
      ns_steps=m.ns_steps,
      ns_dtype=NS_DTYPES[m.ns_dtype],
      ns_method=m.ns_method,
      gram_restart=m.gram_restart,
      eps=m.ns_eps,
      shape_scaling=m.shape_scaling,
      rms_scale=m.rms_scale,
      variant=m.variant,
      normuon_b2=m.normuon_b2,
      hyperball=opt_cfg.hyperball,
      mesh=mesh,
      shard_axis=shard_axis or (),
      param_shardings=param_shardings,
      unroll=unroll_ns,
  ))
