"""The CPU quickstart: a small LLaMA on the embedded corpus (Python's standard library), fp32.

  jaxtrain train                      # same as the line below
  jaxtrain train --config=configs/default.py --workdir=runs/default

Sized to finish in under 10 minutes on a 2-core machine with a clear drop in validation loss.
"""

from jaxtrain.config import base_config


def get_config(arg=""):
  del arg
  cfg = base_config()
  cfg.model.update(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=704, vocab_size=4096,
                   max_seq_len=256, dtype="float32", attention="auto")
  cfg.data.source = "default"
  cfg.data.seq_len = 256
  cfg.optimizer.lr = 1e-3
  cfg.optimizer.warmup_steps = 30
  cfg.train.update(steps=150, batch_size=16, log_every=10, eval_every=50, eval_batches=8)
  cfg.checkpoint.every = 100
  return cfg
