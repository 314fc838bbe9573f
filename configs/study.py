"""The CPU optimizer study (docs/optimizers.md): a 2-layer LLaMA on the embedded corpus, fp32.

  jaxtrain study --config=configs/study.py --optimizers=adamw,muon --seeds=3 --workdir=runs/study

One run (compile, 300 steps of 16 x 64 tokens, 10 evaluations) takes about 20 s on a 2-core
machine; `jaxtrain train --config=configs/study.py` trains one of its runs alone. The study's
lr grid starts at optimizer.lr times 1/2, 1, 2 and extends itself where needed.
"""

from jaxtrain.config import base_config


def get_config(arg=""):
  del arg
  cfg = base_config()
  # d_ff / d_model = 2.75 as in the LLaMA presets: the MLP kernels are the wide matrices.
  cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176, vocab_size=1024,
                   max_seq_len=64, dtype="float32", attention="auto")
  cfg.data.source = "default"
  cfg.data.seq_len = 64
  cfg.optimizer.update(lr=8e-3, warmup_steps=20, schedule="cosine", min_lr_ratio=0.0)
  cfg.train.update(steps=300, batch_size=16, log_every=10, eval_every=30, eval_batches=4,
                   progress_bar=False)
  cfg.checkpoint.update(every=1000, keep=1)
  return cfg
