"""Hyperball: hidden matrices and their updates at fixed Frobenius norms, so the lr is an angle.

Wen, Dang, Lyu, Ma & Liang 2026, "Fantastic Pretraining Optimizers and Where to Find Them II:
Hyperball Optimization", arXiv:2606.16899. With weight decay, a matrix's norm drifts to an
equilibrium set by lr and decay, and that pair decides how fast its direction turns. Hyperball
fixes the turning rate directly: with R the matrix's Frobenius norm at initialisation and u the
base optimizer's direction (Muon's orthogonalised momentum: MuonH; Adam's m/sqrt(v): AdamH),

    W <- R * normalize(W - lr * R * normalize(u)),      normalize(x) = x / ||x||_F,

so every step moves W by an angle of about atan(lr) whatever the gradient's scale, and there is
no weight decay on these matrices. Stacked (scanned) weights are one matrix per layer: norms are
taken over the non-batch axes of the parameter's layout (`routing`).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxtrain.optim import routing


class HyperballState(NamedTuple):
  count: jax.Array  # steps taken, for the lr schedule
  radius: Any  # fp32 Frobenius norm of each matrix at init, shaped like its batch axes
  inner: Any  # the base direction's state


def _matrix_axes(layout: str) -> tuple[int, ...]:
  return tuple(k for k, a in enumerate(layout) if a != 'b')


def _norm(x, layout):
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=_matrix_axes(layout),
                          keepdims=True))


def hyperball(direction: optax.GradientTransformation, learning_rate: optax.ScalarOrSchedule,
              layouts: Callable[[str, tuple], str], eps: float = 1e-12
              ) -> optax.GradientTransformation:
  """Wrap a base direction (no lr, no decay in it) into its Hyperball variant.

  Args:
    direction: e.g. `scale_by_muon(...)` (MuonH) or `optax.scale_by_adam(...)` (AdamH).
    learning_rate: the angular lr (scalar or schedule of the step).
    layouts: (path, shape) -> layout string ('b' batch, 'i'/'o' matrix axes) of every leaf.
    eps: guards the divisions of an all-zero update or matrix.

  Returns:
    A GradientTransformation whose updates need `params`; `optax.apply_updates` then lands every
    matrix on its sphere (the update is the difference of the new and old weights).
  """
  lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def leaf_layouts(tree):
    return [layouts(routing.path_str(kp), tuple(x.shape))
            for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]]

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    radius = [_norm(p, layout) for p, layout in zip(leaves, leaf_layouts(params))]
    return HyperballState(jnp.zeros((), jnp.int32), jax.tree.unflatten(treedef, radius),
                          direction.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('hyperball needs the params (it renormalises the weights)')
    u_tree, inner = direction.update(updates, state.inner, params)
    lr = lr_fn(state.count)
    u_leaves, treedef = jax.tree.flatten(u_tree)
    w_leaves = treedef.flatten_up_to(params)
    r_leaves = treedef.flatten_up_to(state.radius)
    out = []
    for u, w, r, layout in zip(u_leaves, w_leaves, r_leaves, leaf_layouts(params)):
      w32 = w.astype(jnp.float32)
      step = u.astype(jnp.float32) / (_norm(u, layout) + eps)
      moved = w32 - lr * r * step
      new_w = moved * (r / (_norm(moved, layout) + eps))
      out.append((new_w - w32).astype(w.dtype))
    return (jax.tree.unflatten(treedef, out),
            HyperballState(state.count + 1, state.radius, inner))

  return optax.GradientTransformation(init_fn, update_fn)
