"""Learning-rate schedules as multipliers of the peak lr.

One multiplier drives both optimizer groups (Muon lr and AdamW lr), so the groups stay in the ratio
the config sets. All schedules warm up linearly: step s < warmup_steps gets (s + 1) / warmup_steps,
so the first step already moves (a 0 lr step is wasted compute) and step warmup_steps - 1 is at
peak.
Steps are 0-based; `total_steps` is the number of optimizer steps of the run.

- cosine: from the end of warm-up, half a cosine from 1 to min_lr_ratio, reached at total_steps.
- wsd (warmup-stable-decay, Hu et al. 2024, MiniCPM, arXiv:2404.06395): 1 until the last
  decay_fraction of total_steps, then linear to min_lr_ratio at total_steps. The stable phase lets
  a run be extended or branched into a short cooldown at any point.
- constant: 1 after warm-up.
"""

import jax.numpy as jnp

SCHEDULES = ('cosine', 'wsd', 'constant')


def lr_multiplier(schedule: str, total_steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.0, decay_fraction: float = 0.2):
  """An optax-style schedule step -> multiplier in [min_lr_ratio, 1] (jit-friendly)."""
  if schedule not in SCHEDULES:
    raise ValueError(f'unknown schedule {schedule!r}; known: {SCHEDULES}')
  total_steps, warmup_steps = int(total_steps), int(warmup_steps)
  decay_steps = max(1, round(decay_fraction * total_steps))
  decay_start = max(warmup_steps, total_steps - decay_steps)

  def multiplier(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1))
    if schedule == 'constant':
      after = 1.0
    elif schedule == 'cosine':
      frac = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
      after = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:
      frac = jnp.clip((step - decay_start) / max(total_steps - decay_start, 1), 0.0, 1.0)
      after = 1.0 - (1.0 - min_lr_ratio) * frac
    return jnp.where(step < warmup_steps, warm, after)

  return multiplier
