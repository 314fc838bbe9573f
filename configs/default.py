"""The CPU quickstart: a small LLaMA on the embedded corpus (Python's standard library), fp32.

  jaxtrain train                      # same as the line below
  jaxtrain train --config=configs/default.py --workdir=runs/default

Sized to finish in about 5 minutes on an idle 2-core machine and to reach under 1.8 bits per byte
on validation, so that `jaxtrain generate --workdir=runs/default --prompt="def "` looks like Python.
"""

from jaxtrain.config import base_config


def get_config(arg=""):
  del arg
  cfg = base_config()
  cfg.model.update(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=704, vocab_size=4096,
                   max_seq_len=256, dtype="float32", attention="auto")
  cfg.data.source = "default"
  cfg.data.seq_len = 256
  # Muon reaches AdamW's loss in ~2.7x fewer steps on this model (docs/muon.md); 3e-3 was its best lr.
  cfg.optimizer.name = "muon"
  cfg.optimizer.lr = 3e-3
  cfg.optimizer.schedule = "wsd"  # Constant lr, then a linear decay over the last 20% of steps.
  cfg.optimizer.warmup_steps = 20
  # Two evaluations (eval time counts in the 5 minutes).
  cfg.train.update(steps=180, batch_size=16, log_every=10, eval_every=90, eval_batches=8)
  cfg.checkpoint.every = 90
  return cfg
