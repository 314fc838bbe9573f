"""Muon: momentum orthogonalised by Newton-Schulz, as plain optax GradientTransformations.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces the momentum M of a
hidden matrix by an approximation of its polar factor U V^T (M = U S V^T), computed with a few
odd-polynomial Newton-Schulz (NS) steps that only use matmuls. This module is written for the
jaxtrain parameter tree, where every hidden matrix is stacked over layers and attention kernels are
4-D, and it differs from `optax.contrib.muon` where that matters here:

- Matrix layouts come from the parameter path (`routing.DEFAULT_HIDDEN`), never from ndim.
- Matrices of equal (wide) shape, over layers and roles (q, k, v, o; gate, up, down), are
  orthogonalised as one batched loop: fewer, larger kernels.
- The NS loop is a `lax.scan` over coefficient rows, not unrolled, so compile time does not grow
  with ns_steps and per-step coefficients (Polar Express) cost nothing extra.
- On a mesh every device orthogonalises its own share and no two devices the same matrix, for any
  device count (`_split_newton_schulz`): whole matrices split over the devices, and the few left
  over when the count does not divide are split by columns (a small Gram all-reduce per step).
- With a bf16 NS loop the Gram matrix, its polynomial and the coefficients stay fp32; only the
  two large products per step read bf16 operands.
"""

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtrain import ops
from jaxtrain.optim import hyperball as hyperball_lib
from jaxtrain.optim import routing

# Keller Jordan's quintic (modded-nanogpt, 2024), the same row every step. It maximises the slope at
# 0 instead of converging to 1, so singular values end in a band around 1 rather than at 1.
_STANDARD_ROWS = ((3.4445, -4.7750, 2.0315),)

# Amsel, Persson, Musco & Gower 2025, "The Polar Express: Optimal Matrix Sign Methods and Their
# Application to the Muon Algorithm", arXiv:2505.16932, Algorithm 1 (degree 5, lower bound 1e-3).
# Row t is the minimax-optimal odd quintic on the interval that rows < t leave, so any prefix is the
# best composition of its length; from row 8 on the optimum is (15/8, -10/8, 3/8), which longer runs
# repeat. The paper's safety margin for half precision: every row but the last is evaluated at
# x/1.01 (a/1.01, b/1.01^3, c/1.01^5) and the input is scaled by 1/(1.01 ||X||_F), so rounding that
# lifts a singular value slightly above 1 is damped instead of amplified.
_POLAR_EXPRESS_PAPER_ROWS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_PE_SAFETY = 1.01
_POLAR_EXPRESS_ROWS = tuple(
    (a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_PAPER_ROWS[:-1]) + _POLAR_EXPRESS_PAPER_ROWS[-1:]


class NSPreset(NamedTuple):
  rows: tuple[tuple[float, float, float], ...]
  prescale: float  # the Frobenius norm is multiplied by this before dividing


NS_PRESETS = {
    'standard': NSPreset(_STANDARD_ROWS, 1.0),
    'polar_express': NSPreset(_POLAR_EXPRESS_ROWS, _PE_SAFETY),
}

# Where 5 NS steps put the singular values s of X, in exact arithmetic, for every s >= 3e-3 ||X||_F
# (smaller ones are amplified by at most a^5 and may stay below the band; zeros stay zero). Measured
# by iterating the scalar polynomials on a fine grid; tests check it on real matrices in fp32/bf16.
NS_BAND_MIN_RELATIVE_SIGMA = 3e-3
NS_BAND = {'standard': (0.68, 1.21), 'polar_express': (0.87, 1.13)}

SHAPE_SCALINGS = ('spectral', 'rms_match', 'none')
NS_METHODS = ('standard', 'gram')
# Gram NS: recompute R = X X^T from X once, after this many steps (0: never), as the Gram NS
# write-up restarts after its second step for half-precision stability.
GRAM_RESTART = 2
VARIANTS = ('muon', 'normuon')


def ns_coefficients(ns_coeffs='standard', ns_steps: int = 5) -> tuple[np.ndarray, float]:
  """The (ns_steps, 3) coefficient rows and the norm pre-scale that the NS loop runs.

  A preset with one row repeats it; a per-step preset (Polar Express) uses its first ns_steps rows
  and repeats its last (converged) row beyond them. A user table must have one row or exactly
  ns_steps rows: silently dropping or padding someone's tuned schedule would change its meaning.
  """
  if isinstance(ns_steps, bool) or not isinstance(ns_steps, (int, np.integer)) or ns_steps < 1:
    raise ValueError(f'ns_steps must be an int >= 1, got {ns_steps!r}')
  if isinstance(ns_coeffs, str):
    if ns_coeffs not in NS_PRESETS:
      raise ValueError(f'unknown ns_coeffs preset {ns_coeffs!r}; known: {sorted(NS_PRESETS)}')
    rows, prescale = NS_PRESETS[ns_coeffs]
    rows = np.asarray(rows, np.float64)
    take = np.minimum(np.arange(ns_steps), len(rows) - 1)
    return rows[take], prescale
  rows = np.asarray(ns_coeffs, np.float64)
  if rows.ndim == 1:
    rows = rows[None]
  if rows.ndim != 2 or rows.shape[1] != 3:
    raise ValueError(f'ns_coeffs must have shape (3,) or (rows, 3), got {rows.shape}')
  if len(rows) == 1:
    return np.repeat(rows, ns_steps, axis=0), 1.0
  if len(rows) != ns_steps:
    raise ValueError(f'ns_coeffs has {len(rows)} rows but ns_steps={ns_steps}; give one row '
                     '(repeated) or exactly one row per step')
  return rows, 1.0


def _orthogonalize_wide(x_BMN, coeffs_S3, prescale, eps, ns_dtype, split=None, unroll=False,
                        method='standard', gram_restart=GRAM_RESTART):
  """NS on a stack of matrices with M <= N (so the Gram matrix X X^T is the small one).

  Input and output are fp32; the loop's large products read ns_dtype operands and accumulate in
  fp32, while the M x M Gram matrix, its square and the polynomial stay fp32 (bf16 would round
  the polynomial that sets every singular value). `split`: None, or (mesh, axes) to split each
  matrix by columns over those mesh axes: the Gram matrix is then reduce-scattered by rows, its
  square computed by rows, and the polynomial all-gathered (M x M traffic, small beside X).
  """
  x_BMN = x_BMN.astype(jnp.float32)
  norm_B11 = jnp.sqrt(jnp.sum(jnp.square(x_BMN), axis=(-2, -1), keepdims=True))
  # eps keeps an all-zero update (e.g. a frozen or unused layer) at zero instead of NaN.
  x_BMN = (x_BMN / (norm_B11 * prescale + eps)).astype(ns_dtype)
  eye_MM = jnp.eye(x_BMN.shape[-2], dtype=jnp.float32)
  b = ''.join(chr(ord('p') + i) for i in range(x_BMN.ndim - 2))  # batch axes, named

  if split is None:
    cols = rows = full = lambda a: a
  else:
    mesh, axes = split
    lead = (None,) * (x_BMN.ndim - 2)
    on = axes if len(axes) > 1 else axes[0]
    cols = lambda a: _place(a, P(*lead, None, on), mesh)
    rows = lambda a: _place(a, P(*lead, on, None), mesh)
    full = lambda a: _place(a, P(), mesh)

  def ns_step(x_BMN, abc_3):
    # X <- a X + b (X X^T) X + c (X X^T)^2 X, evaluated as (a I + b A + c A A) X with A = X X^T:
    # the a-term goes on the small M x M side, which saves a pass over X per step.
    x_BMN = cols(x_BMN)
    gram_BMM = ops.einsum(f'{b}mn,{b}kn->{b}mk', x_BMN, x_BMN, preferred_element_type=jnp.float32)
    gram_rows_BMM = rows(gram_BMM)
    square_BMM = jnp.einsum(f'{b}mk,{b}kj->{b}mj', gram_rows_BMM, full(gram_BMM))
    poly_BMM = abc_3[0] * eye_MM + abc_3[1] * gram_rows_BMM + abc_3[2] * square_BMM
    poly_BMM = full(poly_BMM).astype(ns_dtype)
    return cols(jnp.einsum(f'{b}mk,{b}kn->{b}mn', poly_BMM, x_BMN)), None

  M, N = x_BMN.shape[-2:]
  if method == 'gram' and uses_gram(M, N, len(coeffs_S3), gram_restart):
    return _gram_newton_schulz(x_BMN, coeffs_S3, gram_restart, ns_dtype, b, eye_MM, cols, full,
                               unroll).astype(jnp.float32)
  x_BMN, _ = jax.lax.scan(ns_step, x_BMN, jnp.asarray(coeffs_S3, jnp.float32), unroll=unroll)
  return x_BMN.astype(jnp.float32)


def _gram_segments(steps, gram_restart):
  """Lengths of the runs of NS steps between two reads of X: one restart, after step
  `gram_restart`, recomputes X X^T from X (the write-up's choice for 5 steps)."""
  if not gram_restart or gram_restart >= steps:
    return [steps]
  return [gram_restart, steps - gram_restart]


def _gram_newton_schulz(x_BMN, coeffs_S3, gram_restart, ns_dtype, b, eye_MM, cols, full, unroll):
  """The NS steps of `_orthogonalize_wide` iterated on the M x M Gram matrix (M <= N).

  Gram Newton-Schulz (Zhang, Amsel, Chen & Dao 2026, "Gram Newton-Schulz: a fast, hardware-aware
  Newton-Schulz algorithm for Muon", https://dao-lab.ai/blog/2026/gram-newton-schulz): every step
  is X <- Z X with Z = p(R) a polynomial of R = X X^T, so Z commutes with R and
    R_{t+1} = Z R_t Z,   Q_{t+1} = Z Q_t,   X_T = Q_T X_0.
  X is read twice per segment (R = X X^T at the start, Q X at the end) instead of twice per step;
  the steps in between are M x M products. In exact arithmetic the result is the standard NS
  output; the write-up restarts (recomputes R from X) after a few steps because R drifts in half
  precision, which `gram_restart` does here (the M x M side is fp32 in any case).
  """
  coeffs_S3 = np.asarray(coeffs_S3, np.float32)
  mm = lambda u, v: jnp.einsum(f'{b}mk,{b}kj->{b}mj', u, v)
  poly = lambda r, abc: abc[0] * eye_MM + abc[1] * r + abc[2] * mm(r, r)
  start = 0
  for length in _gram_segments(len(coeffs_S3), gram_restart):
    rows = jnp.asarray(coeffs_S3[start:start + length])
    start += length
    x_BMN = cols(x_BMN)
    r_BMM = full(ops.einsum(f'{b}mn,{b}kn->{b}mk', x_BMN, x_BMN,
                            preferred_element_type=jnp.float32))
    q_BMM = poly(r_BMM, rows[0])  # Q_0 = I, so the first step's Z is Q
    if length > 1:
      r_BMM = mm(q_BMM, mm(r_BMM, q_BMM))

      def gram_step(carry, abc_3):
        q_BMM, r_BMM = carry
        z_BMM = poly(r_BMM, abc_3)
        return (mm(z_BMM, q_BMM), mm(z_BMM, mm(r_BMM, z_BMM))), None

      if length > 2:
        (q_BMM, r_BMM), _ = jax.lax.scan(gram_step, (q_BMM, r_BMM), rows[1:-1], unroll=unroll)
      q_BMM = mm(poly(r_BMM, rows[-1]), q_BMM)  # the last step needs no new R
    x_BMN = cols(jnp.einsum(f'{b}mk,{b}kn->{b}mn', full(q_BMM).astype(ns_dtype), x_BMN))
  return x_BMN


def _split_newton_schulz(x_BMN, coeffs_S3, prescale, eps, ns_dtype, mesh, axes, unroll=False,
                         method='standard', gram_restart=GRAM_RESTART):
  """NS of a stack of B wide matrices with every device of `axes` doing 1/n of the work.

  The first n * (B // n) matrices are split whole over the n devices (no communication inside
  NS); the B % n left over are split by columns over all n devices when their dims divide, and
  otherwise padded with zero matrices to one per device (NS of zero is zero).
  """
  ns = functools.partial(_orthogonalize_wide, coeffs_S3=coeffs_S3, prescale=prescale, eps=eps,
                         ns_dtype=ns_dtype, unroll=unroll, method=method,
                         gram_restart=gram_restart)
  if not axes:
    return ns(x_BMN)
  n = math.prod(mesh.shape[a] for a in axes)
  whole_matrices = P(axes if len(axes) > 1 else axes[0], None, None)
  B, M, N = x_BMN.shape
  whole = n * (B // n)
  parts = []
  if whole:
    x = _place(x_BMN[:whole], whole_matrices, mesh)
    parts.append(_place(ns(x), whole_matrices, mesh))
  rest = B - whole
  if rest and M % n == 0 and N % n == 0:
    parts.append(ns(x_BMN[whole:], split=(mesh, axes)))
  elif rest:
    padded = jnp.concatenate([x_BMN[whole:], jnp.zeros((n - rest, M, N), x_BMN.dtype)])
    y = ns(_place(padded, whole_matrices, mesh))
    parts.append(_place(y, whole_matrices, mesh)[:rest])
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def orthogonalize(x, ns_coeffs='standard', ns_steps: int = 5, *, eps: float = 1e-7,
                  ns_dtype=jnp.float32, method: str = 'standard',
                  gram_restart: int = GRAM_RESTART, unroll: bool = False):
  """Approximate polar factor of every matrix in `x` (last two axes; leading axes are batch).

  Returns fp32. Tall matrices are transposed so the Gram matrix is min(m, n) square: the result is
  the same (p(X^T)^T = p(X) for odd p) at a fraction of the FLOPs. method='gram' runs Gram
  Newton-Schulz (`_gram_newton_schulz`) where it has fewer FLOPs (`uses_gram`).
  """
  if method not in NS_METHODS:
    raise ValueError(f'unknown NS method {method!r}; known: {NS_METHODS}')
  coeffs_S3, prescale = ns_coefficients(ns_coeffs, ns_steps)
  if x.ndim < 2:
    raise ValueError(f'orthogonalize needs a matrix (..., m, n), got shape {x.shape}')
  tall = x.shape[-2] > x.shape[-1]
  x_BMN = jnp.swapaxes(x, -1, -2) if tall else x
  out_BMN = _orthogonalize_wide(x_BMN, coeffs_S3, prescale, eps, ns_dtype, unroll=unroll,
                                method=method, gram_restart=gram_restart)
  return jnp.swapaxes(out_BMN, -1, -2) if tall else out_BMN


def ns_flops(m: int, n: int, ns_steps: int, method: str = 'standard',
             gram_restart: int = GRAM_RESTART) -> int:
  """Matmul FLOPs of orthogonalising one m x n matrix.

  standard: per step X X^T, A A and B X. gram (where `uses_gram`): per segment between restarts
  X X^T and Q X, and on the small side R R per step plus Z Q and Z R Z for the steps in between.
  """
  m, n = min(m, n), max(m, n)
  standard = ns_steps * (2 * m * m * n + 2 * m * m * m + 2 * m * m * n)
  if method == 'standard':
    return standard
  if method != 'gram':
    raise ValueError(f'unknown NS method {method!r}; known: {NS_METHODS}')
  gram = sum(4 * m * m * n + 2 * m ** 3 + 8 * m ** 3 * (s - 1)
             for s in _gram_segments(ns_steps, gram_restart))
  return min(gram, standard)


def uses_gram(m: int, n: int, ns_steps: int, gram_restart: int = GRAM_RESTART) -> bool:
  """Whether Gram NS has fewer FLOPs than standard NS for an m x n matrix.

  Gram NS trades per-step passes over X (4 m^2 n) for M x M products (8 m^3 per step), so it
  wins for wide matrices (n > ~1.5 m: MLP kernels) and loses for square ones (q, k, v, o), which
  keep the standard loop, as in the write-up's own fallback.
  """
  m, n = min(m, n), max(m, n)
  return ns_flops(m, n, ns_steps, 'gram', gram_restart) < ns_flops(m, n, ns_steps)


def shape_scale(fan_in: int, fan_out: int, shape_scaling: str, rms_scale: float = 0.2) -> float:
  """Per-matrix update multiplier.

  `spectral`: sqrt(max(1, fan_out/fan_in)) (Jordan; Bernstein & Newhouse), the spectral-norm-correct
  size so one lr transfers across widths. `rms_match`: rms_scale * sqrt(max(fan_in, fan_out))
  (Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982): an orthogonal m x n
  matrix has RMS 1/sqrt(max(m, n)), so this gives every Muon update RMS ~0.2, the RMS of typical
  AdamW updates, and Muon can share AdamW's lr and weight decay.
  """
  if shape_scaling == 'spectral':
    return math.sqrt(max(1.0, fan_out / fan_in))
  if shape_scaling == 'rms_match':
    return rms_scale * math.sqrt(max(fan_in, fan_out))
  if shape_scaling == 'none':
    return 1.0
  raise ValueError(f'unknown shape_scaling {shape_scaling!r}; known: {SHAPE_SCALINGS}')


class MuonState(NamedTuple):
  mu: Any  # fp32 momentum, shaped like the params
  nu: Any  # NorMuon: fp32 per-output-neuron second moment, batch_shape + (fan_out,); else None


class _LeafPlan(NamedTuple):
  """How one leaf became a stack of wide matrices, to undo it after NS."""
  unflatten: Callable  # (B, fan_in, fan_out) -> parameter shape
  tall: bool  # fan_in > fan_out, so NS saw the transpose
  fan_in: int
  fan_out: int


def _default_layout(path, shape):
  del path
  return 'b' * (len(shape) - 2) + 'io'


def _resolve_layouts(layouts, tree):
  """Layout string per leaf of `tree`, in leaf order."""
  leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
  if layouts is None or callable(layouts):
    fn = layouts or _default_layout
    out = [fn(routing.path_str(kp), x.shape) for kp, x in leaves_with_path]
  else:
    out = jax.tree.structure(tree).flatten_up_to(layouts)
  for (kp, x), layout in zip(leaves_with_path, out):
    routing.check_layout(layout, x.shape, routing.path_str(kp))
  return out


def _to_matrices(x, layout):
  """x -> x_BIO (batch, fan_in, fan_out) and the function that undoes it."""
  order = [k for a in 'bio' for k, c in enumerate(layout) if c == a]
  shape_t = [x.shape[k] for k in order]
  nb, ni = layout.count('b'), layout.count('i')
  batch, fan_in = math.prod(shape_t[:nb]), math.prod(shape_t[nb:nb + ni])
  x_BIO = jnp.transpose(x, order).reshape(batch, fan_in, -1)
  inverse = np.argsort(order)
  return x_BIO, lambda y_BIO: jnp.transpose(y_BIO.reshape(shape_t), inverse)


def _sharding_lookup(param_shardings, mesh):
  """path -> NamedSharding, so masked (partitioned) update trees can find their leaf's sharding."""
  if param_shardings is None:
    return {}
  is_leaf = lambda s: isinstance(s, (NamedSharding, P))
  out = {}
  for kp, s in jax.tree_util.tree_flatten_with_path(param_shardings, is_leaf=is_leaf)[0]:
    if isinstance(s, P):
      if mesh is None:
        raise ValueError('param_shardings given as PartitionSpecs need a mesh')
      s = NamedSharding(mesh, s)
    out[routing.path_str(kp)] = s
  return out


def _shard_axes(mesh, shard_axis):
  """The mesh axes of size > 1 to split NS over (names the mesh lacks are skipped)."""
  if mesh is None:
    return ()
  axes = (shard_axis,) if isinstance(shard_axis, str) else tuple(shard_axis)
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def _typed_mesh(x):
  """The mesh in x's type when it has Explicit axes (sharding in types), else None."""
  mesh = getattr(getattr(jax.typeof(x), 'sharding', None), 'mesh', None)
  if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
    return None
  return mesh


def _place(x, spec, mesh):
  """Move x to `spec`: a reshard under Explicit mesh axes, a sharding constraint under Auto ones.

  With Explicit axes this also runs when no mesh was given, to replicate the matrix axes: a dot
  that contracts a sharded axis is an error there, not a silent all-reduce.
  """
  typed = _typed_mesh(x)
  if typed is not None:
    return jax.sharding.reshard(x, NamedSharding(typed, spec))
  if mesh is None:
    return x
  if AxisType.Explicit in tuple(mesh.axis_types):  # e.g. state created outside the mesh
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _sharding_of(x):
  """x's sharding when it is part of its type (Explicit axes); otherwise XLA decides, so None."""
  return jax.typeof(x).sharding if _typed_mesh(x) is not None else None


def _restore(x, sharding):
  if sharding is None:
    return x
  mesh = getattr(sharding, 'mesh', None)
  if _typed_mesh(x) is not None or AxisType.Explicit in tuple(getattr(mesh, 'axis_types', ())):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coeffs='standard',
    ns_steps: int = 5,
    ns_dtype=jnp.float32,
    eps: float = 1e-7,
    shape_scaling: str = 'rms_match',
    rms_scale: float = 0.2,
    variant: str = 'muon',
    normuon_b2: float = 0.95,
    normuon_eps: float = 1e-10,
    layouts=None,
    group_by_shape: bool = True,
    mesh: Mesh | None = None,
    shard_axis: str | Sequence[str] = ('data', 'fsdp', 'tensor'),
    param_shardings=None,
    unroll: bool = False,
    ns_method: str = 'standard',
    gram_restart: int = GRAM_RESTART,
) -> optax.GradientTransformation:
  """Muon direction for every leaf: fp32 momentum, Newton-Schulz, optional NorMuon, shape scaling.

  Learning rate and weight decay are left to the caller (`muon()` chains them), as for any optax
  `scale_by_*`.

  Args:
    momentum: beta of M <- beta M + (1 - beta) G. No bias correction: NS divides by ||M||_F, so a
      global scale on M changes nothing.
    nesterov: orthogonalise (1 - beta) G + beta M instead of M (Jordan's default).
    ns_coeffs: 'standard', 'polar_express', one (a, b, c) row, or exactly ns_steps rows.
    ns_steps: NS iterations.
    ns_dtype: dtype of the NS loop (jnp.bfloat16 halves its time on GPUs); input/output stay fp32.
    eps: added to the Frobenius norm before dividing.
    shape_scaling: 'rms_match', 'spectral' or 'none'; see `shape_scale`.
    rms_scale: target update RMS of 'rms_match'.
    variant: 'muon' or 'normuon' (Li et al. 2025, "NorMuon: Making Muon more efficient and
      scalable", arXiv:2510.05491): after NS, divide each output neuron's column by the sqrt of an
      EMA (normuon_b2) of its mean square, then restore the NS output's Frobenius norm. The result
      is invariant to the scale of G and evens out neurons that NS leaves uneven.
    layouts: None (last two axes are the matrix, leading axes batch), a callable
      (path, shape) -> layout string, or a pytree of layout strings; see `routing`.
    group_by_shape: run all matrices of one (wide) shape as one batched NS loop (fewer, larger
      ops, and an even split over devices); False runs one loop per leaf.
    mesh: if given, NS work is split over the devices of `shard_axis` (`_split_newton_schulz`).
    shard_axis: mesh axis name (or names) whose devices share the NS work; axes of size 1 are
      ignored. The default, every axis, gives each device of the mesh its own matrices.
    param_shardings: optional pytree (like params) of NamedSharding/PartitionSpec; updates are
      constrained back to them after NS. Without it XLA's propagation picks the output layout.
    unroll: unroll the NS loop instead of a scan (same numbers; XLA's cost analysis counts a
      loop body once, so the planner unrolls to count every step).
    ns_method: 'standard', or 'gram' for Gram Newton-Schulz on the matrices where it saves FLOPs
      (`uses_gram`: the wide MLP kernels; square ones keep the standard loop).
    gram_restart: Gram NS recomputes X X^T from X once, after this many steps (0: never).

  Returns:
    An optax.GradientTransformation with state `MuonState`.
  """
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; known: {VARIANTS}')
  if ns_method not in NS_METHODS:
    raise ValueError(f'unknown ns_method {ns_method!r}; known: {NS_METHODS}')
  shape_scale(1, 1, shape_scaling)  # validates the name early
  coeffs_S3, prescale = ns_coefficients(ns_coeffs, ns_steps)
  ns_dtype = jnp.dtype(ns_dtype)
  shardings = _sharding_lookup(param_shardings, mesh)

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    nu = None
    if variant == 'normuon':
      leaves, treedef = jax.tree.flatten(params)
      nu_leaves = []
      for p, layout in zip(leaves, _resolve_layouts(layouts, params)):
        batch_shape = tuple(d for d, a in zip(p.shape, layout) if a == 'b')
        nu_leaves.append(jnp.zeros(batch_shape + (routing.fans(p.shape, layout)[1],), jnp.float32))
      nu = jax.tree.unflatten(treedef, nu_leaves)
    return MuonState(mu=mu, nu=nu)

  def update_fn(updates, state, params=None):
    del params
    g_leaves, treedef = jax.tree.flatten(updates)
    paths = routing.leaf_paths(updates)
    layout_leaves = _resolve_layouts(layouts, updates)
    mu_leaves = treedef.flatten_up_to(state.mu)
    nu_leaves = treedef.flatten_up_to(state.nu) if variant == 'normuon' else [None] * len(g_leaves)
    axes = _shard_axes(mesh, shard_axis)

    new_mu, wide, undo, groups = [], [], [], {}
    for k, (g, mu, layout) in enumerate(zip(g_leaves, mu_leaves, layout_leaves)):
      mu = momentum * mu + (1.0 - momentum) * g.astype(jnp.float32)
      new_mu.append(mu)
      d = (1.0 - momentum) * g.astype(jnp.float32) + momentum * mu if nesterov else mu
      d_BIO, unflatten = _to_matrices(d, layout)
      # Each leaf as a stack of wide (M <= N) matrices; equal shapes share one NS call.
      tall = d_BIO.shape[1] > d_BIO.shape[2]
      wide.append(jnp.swapaxes(d_BIO, 1, 2) if tall else d_BIO)
      undo.append(_LeafPlan(unflatten, tall, d_BIO.shape[1], d_BIO.shape[2]))
      groups.setdefault(wide[-1].shape[1:] if group_by_shape else k, []).append(k)

    ortho = [None] * len(wide)
    for members in groups.values():
      xs = [wide[k] for k in members]
      if len(xs) > 1 and _typed_mesh(xs[0]) is not None:  # Explicit axes: one sharding to join
        xs = [_place(x, P(), mesh) for x in xs]
      x_BMN = xs[0] if len(xs) == 1 else jnp.concatenate(xs)
      y_BMN = _split_newton_schulz(x_BMN, coeffs_S3, prescale, eps, ns_dtype, mesh, axes,
                                   unroll, ns_method, gram_restart)
      offsets = np.cumsum([0] + [x.shape[0] for x in xs])
      for j, k in enumerate(members):
        ortho[k] = y_BMN[offsets[j]:offsets[j + 1]]

    out, new_nu = [], []
    for k, (unflatten, tall, fan_in, fan_out) in enumerate(undo):
      o_BIO = jnp.swapaxes(ortho[k], 1, 2) if tall else ortho[k]
      if variant == 'normuon':
        nu = nu_leaves[k]
        nu_BO = nu.reshape(-1, fan_out)
        nu_BO = normuon_b2 * nu_BO + (1.0 - normuon_b2) * jnp.mean(jnp.square(o_BIO), axis=1)
        new_nu.append(_restore(nu_BO.reshape(nu.shape), _sharding_of(nu)))
        normed_BIO = o_BIO / (jnp.sqrt(nu_BO)[:, None, :] + normuon_eps)
        norm_B11 = jnp.sqrt(jnp.sum(jnp.square(o_BIO), axis=(1, 2), keepdims=True))
        normed_norm_B11 = jnp.sqrt(jnp.sum(jnp.square(normed_BIO), axis=(1, 2), keepdims=True))
        o_BIO = normed_BIO * (norm_B11 / (normed_norm_B11 + normuon_eps))
      o_BIO = o_BIO * shape_scale(fan_in, fan_out, shape_scaling, rms_scale)
      u = unflatten(o_BIO).astype(g_leaves[k].dtype)
      out.append(_restore(u, shardings.get(paths[k]) or _sharding_of(g_leaves[k])))

    nu = jax.tree.unflatten(treedef, new_nu) if variant == 'normuon' else None
    return jax.tree.unflatten(treedef, out), MuonState(jax.tree.unflatten(treedef, new_mu), nu)

  return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    weight_decay: float = 0.0,
    adam_weight_decay: float | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    hidden: Sequence[tuple[str, str]] = routing.DEFAULT_HIDDEN,
    no_decay: Sequence[str] = routing.DEFAULT_NO_DECAY,
    hyperball: bool = False,
    **muon_kwargs,
) -> optax.GradientTransformation:
  """Muon for the hidden matrices chosen by `hidden`, AdamW for every other parameter.

  Args:
    learning_rate: Muon lr (scalar or schedule). With shape_scaling='rms_match' (default) the same
      value as a tuned AdamW lr is a good start.
    adam_learning_rate: lr of the AdamW group; defaults to learning_rate.
    weight_decay: decoupled decay of the Muon group (multiplied by the lr, as in optax.adamw).
    adam_weight_decay: decay of the AdamW group; defaults to weight_decay.
    adam_b1, adam_b2, adam_eps: AdamW moments of the AdamW group.
    hidden: (regex, layout) rows; a parameter whose '/'-joined path fullmatches a regex goes to Muon
      with that layout (first match wins), everything else to AdamW.
    no_decay: regexes of paths that get no weight decay in either group (norm scales, biases).
    hyperball: MuonH (`hyperball.hyperball`, arXiv:2606.16899): the hidden matrices and their
      updates keep fixed Frobenius norms and learning_rate is an angle; weight_decay is then not
      applied to them (the AdamW group keeps its own).
    **muon_kwargs: passed to `scale_by_muon` (momentum, ns_coeffs, ns_steps, ns_dtype, variant,
      shape_scaling, mesh, shard_axis, param_shardings, ...).

  Returns:
    An optax.GradientTransformation; its state is an `optax.PartitionState` with groups
    'muon' and 'adamw'.
  """
  hidden = tuple(tuple(row) for row in hidden)
  adam_learning_rate = learning_rate if adam_learning_rate is None else adam_learning_rate
  adam_weight_decay = weight_decay if adam_weight_decay is None else adam_weight_decay
  decay_mask = routing.decay_mask_fn(no_decay)

  def labels(params):
    return routing.map_with_path(
        lambda p, _: routing.MUON if routing.hidden_layout(p, hidden) else routing.ADAMW, params)

  def layout_fn(path, shape):
    del shape
    return routing.hidden_layout(path, hidden)

  if hyperball:
    muon_group = hyperball_lib.hyperball(scale_by_muon(layouts=layout_fn, **muon_kwargs),
                                         learning_rate, layout_fn)
  else:
    muon_group = optax.chain(
        scale_by_muon(layouts=layout_fn, **muon_kwargs),
        optax.add_decayed_weights(weight_decay, decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
  return optax.partition(
      {
          routing.MUON: muon_group,
          routing.ADAMW: optax.adamw(
              adam_learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
              weight_decay=adam_weight_decay, mask=decay_mask),
      },
      labels,
  )
