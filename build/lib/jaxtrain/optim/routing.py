"""Which optimizer owns which parameter, decided by the parameter's path.

Routing is by path and never by ndim: a stacked norm scale (L, D) is 2-D and an attention kernel
(L, D, N, H) is 4-D, so ndim says nothing about whether a tensor is a hidden matrix. Patterns are
`re.fullmatch`ed against the '/'-joined dict keys (big_vision style); the first matching row wins.

A Muon row carries a layout string with one letter per axis of the parameter: `b` batch (the
stacked layer axis L, orthogonalised independently), `i` fan-in (the axes that `x @ W` contracts),
`o` fan-out.
The matrix that Muon orthogonalises is the (prod(i), prod(o)) reshape, e.g. (D, N*H) for wq.
"""

import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.errors import UserError

MUON = 'muon'
ADAMW = 'adamw'

# Hidden matrices of the LLaMA block, layers stacked on the leading axis. Forward use is y = x @ W.
DEFAULT_HIDDEN = (
    # wq (L, D, N, H), wk/wv (L, D, K, H): fan-in D, fan-out heads * head_dim.
    (r'blocks/attn/w[qkv]', 'bioo'),
    # wo (L, N, H, D): fan-in N * H, fan-out D.
    (r'blocks/attn/wo', 'biio'),
    # w_gate/w_up (L, D, F): fan-in D, fan-out F; w_down (L, F, D): fan-in F, fan-out D.
    (r'blocks/mlp/w_(gate|up|down)', 'bio'),
)

# Parameters exempt from weight decay: decaying a norm scale pulls it towards 0, i.e. shrinks the
# activations; decaying a bias has no regularising purpose.
DEFAULT_NO_DECAY = (r'.*/scale', r'(.*/)?bias')


def key_str(key) -> str:
  """One path element as text: dict key, attribute name or sequence index."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath) -> str:
  return '/'.join(key_str(k) for k in keypath)


def leaf_paths(tree) -> list[str]:
  """'/'-joined paths of the leaves of `tree`, in `jax.tree.leaves` order."""
  return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_path(fn, tree):
  """`jax.tree.map` where `fn(path_str, leaf)` sees the leaf's '/'-joined path."""
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree)


def first_match(path: str, patterns: Iterable[str]) -> int | None:
  for k, pattern in enumerate(patterns):
    if re.fullmatch(pattern, path):
      return k
  return None


def hidden_layout(path: str, hidden: Sequence[tuple[str, str]]) -> str | None:
  """The Muon layout of `path` from a (regex, layout) table, or None if it goes to AdamW."""
  k = first_match(path, [row[0] for row in hidden])
  return None if k is None else hidden[k][1]


def check_layout(layout: str, shape: Sequence[int], path: str, key: str = 'layout') -> None:
  """Rejects a layout that cannot describe `shape`, naming the offending config key and path."""
  if layout is None:
    raise UserError(f'{key}: no Muon layout for {path} (shape {tuple(shape)})')
  if len(layout) != len(shape):
    raise UserError(f'{key}: layout {layout!r} for {path} has {len(layout)} axes but the '
                    f'parameter has shape {tuple(shape)}')
  if set(layout) - set('bio') or 'i' not in layout or 'o' not in layout:
    raise UserError(f"{key}: layout {layout!r} for {path} must use only 'b', 'i', 'o' with at "
                    "least one 'i' and one 'o'")


def fans(shape: Sequence[int], layout: str) -> tuple[int, int]:
  """(fan_in, fan_out) of a parameter from its layout."""
  fan_in = int(np.prod([d for d, a in zip(shape, layout) if a == 'i']))
  fan_out = int(np.prod([d for d, a in zip(shape, layout) if a == 'o']))
  return fan_in, fan_out


def decay_mask_fn(no_decay: Sequence[str]):
  """A callable for optax masks: True where weight decay applies, by path."""
  return lambda tree: map_with_path(lambda p, _: first_match(p, no_decay) is None, tree)


def _hidden(opt_cfg):
  return tuple(tuple(row) for row in opt_cfg.muon.hidden)


def param_group(path: str, opt_cfg) -> str:
  if opt_cfg.name == MUON and hidden_layout(path, _hidden(opt_cfg)) is not None:
    return MUON
  return ADAMW


def routing_table(params, opt_cfg) -> list[tuple[str, tuple[int, ...], str]]:
  """[(path, shape, group)] for every parameter; group is 'muon' or 'adamw'.

  `params` may hold arrays or `jax.ShapeDtypeStruct`s, so `jaxtrain info` can show the routing of a
  model that was never materialised.
  """
  hidden = _hidden(opt_cfg)
  rows = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path, shape = path_str(kp), tuple(leaf.shape)
    group = param_group(path, opt_cfg)
    if group == MUON:
      check_layout(hidden_layout(path, hidden), shape, path, 'optimizer.muon.hidden')
    rows.append((path, shape, group))
  return rows


def format_routing_table(rows) -> str:
  """A plain-text table of `routing_table` rows with per-group parameter counts."""
  headers = ('path', 'shape', 'group', 'params')
  body = [(p, 'x'.join(map(str, s)) or 'scalar', g, f'{int(np.prod(s)):,}') for p, s, g in rows]
  widths = [max(len(r[c]) for r in [headers, *body]) for c in range(4)]
  fmt = lambda r: '  '.join(
      (c.rjust(w) if k == 3 else c.ljust(w)) for k, (c, w) in enumerate(zip(r, widths))).rstrip()
  lines = [fmt(headers), fmt(tuple('-' * w for w in widths))] + [fmt(r) for r in body]
  totals = {}
  for _, s, g in rows:
    n, count = totals.get(g, (0, 0))
    totals[g] = (n + int(np.prod(s)), count + 1)
  lines.append('; '.join(f'{g}: {c} tensors, {n:,} params' for g, (n, c) in sorted(totals.items())))
  return '\n'.join(lines)


def group_update_rms(updates, opt_cfg) -> dict[str, jax.Array]:
  """Root-mean-square of the updates of each optimizer group, for the training log.

  One number per group (sum of squares over all its elements), so a group with one huge tensor is
  not hidden by many small ones. Routing is by path at trace time, so this is free to jit.
  """
  sums, counts = {}, {}
  for kp, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    group = param_group(path_str(kp), opt_cfg)
    sums[group] = sums.get(group, 0.0) + jnp.sum(jnp.square(u.astype(jnp.float32)))
    counts[group] = counts.get(group, 0) + u.size
  return {f'update_rms_{g}': jnp.sqrt(sums[g] / max(counts[g], 1)) for g in sorted(sums)}
