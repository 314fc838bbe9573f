"""QK-clip: cap the attention logits by rescaling W_q and W_k of the heads that exceed tau.

Kimi K2 (Kimi Team 2025, "Kimi K2: Open Agentic Intelligence", arXiv:2507.20534, MuonClip): after
the optimizer update, every head h whose largest attention logit S_h = max q.k / sqrt(d) in the
step's batch exceeded tau has eta_h = tau / S_h, and W_q and W_k of that head are multiplied by
sqrt(eta_h) each, so the logit, bilinear in the two, becomes at most tau for that batch. Heads
below tau are untouched; it is a weight edit, not a loss term, so nothing else in training changes.

Two details of our LLaMA block:
- RoPE rotates q and k per head by position after the projection; the rotation is linear and per
  head, so scaling a head's W_q or W_k scales its rotated q or k by the same factor (Kimi needs a
  special case only for MLA's rotary key shared across heads, which we do not have).
- GQA: one kv head serves G query heads. The shared W_k head is scaled by sqrt(min eta) over its
  group and each query head by sqrt(its own eta): every head's logit then shrinks by
  sqrt(eta_q * eta_group) <= eta_q, so all heads are capped, and a kv group none of whose heads
  exceeds tau is untouched.
"""

import jax.numpy as jnp


def clip_factors(max_logits_LN, tau, n_kv_heads):
  """(W_q factor [L, N], W_k factor [L, K]) from the per-layer, per-head max logits."""
  L, N = max_logits_LN.shape
  eta_LN = jnp.minimum(1.0, tau / jnp.maximum(max_logits_LN, 1e-30))
  eta_LK = jnp.min(eta_LN.reshape(L, n_kv_heads, N // n_kv_heads), axis=-1)
  return jnp.sqrt(eta_LN), jnp.sqrt(eta_LK)


def clip_qk(params, max_logits_LN, tau):
  """`params` with blocks/attn/wq (L, D, N, H) and wk (L, D, K, H) rescaled per head."""
  attn = params["blocks"]["attn"]
  wq, wk = attn["wq"], attn["wk"]
  q_LN, k_LK = clip_factors(max_logits_LN.astype(jnp.float32), tau, wk.shape[2])
  new_attn = {**attn, "wq": (wq * q_LN[:, None, :, None]).astype(wq.dtype),
              "wk": (wk * k_LK[:, None, :, None]).astype(wk.dtype)}
  return {**params, "blocks": {**params["blocks"], "attn": new_attn}}
