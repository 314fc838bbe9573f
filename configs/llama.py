"""LLaMA sizes x hardware.

  jaxtrain train --config=configs/llama.py:35m,cpu --workdir=runs/35m
  jaxtrain train --config=configs/llama.py:125m,h100 --config.optimizer.name=muon --workdir=runs/x
  jaxtrain info --config=configs/llama.py:1.4b

The argument is `SIZE[,HARDWARE]`. SIZE: toy, 35m, 125m, 350m, 760m, 1.4b. HARDWARE: cpu (fp32,
the default), a40, a100, h100, h200: bf16 compute with fp32 master weights, cuDNN attention,
FSDP over all devices (`mesh.fsdp=-1`), a per-device batch (`train.batch_size_per_device`, so
the global batch grows with the GPU count) and Newton-Schulz in bf16. Check that a preset fits
before launching: `jaxtrain info --config=configs/llama.py:1.4b,a40 --plan --devices=8`.
"""

from jaxtrain.config import base_config

# d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab_size. Untied embeddings throughout.
SIZES = {
    "toy": (320, 6, 5, 5, 864, 4096),  # ~10M
    "35m": (512, 8, 8, 8, 1408, 8192),
    "125m": (768, 12, 12, 12, 2048, 32000),
    "350m": (1024, 24, 16, 16, 2816, 32000),
    "760m": (1536, 24, 16, 16, 4096, 32000),
    "1.4b": (2048, 24, 16, 16, 5888, 32000),  # 1.402B parameters
}

# Per-device batch (sequences of 2048 tokens) on a 48 GB (45 GiB visible) A40 and on the
# 80 GB+ GPUs, with remat=dots under FSDP on 8 GPUs: each fits XLA's plan with room to spare
# (`jaxtrain info --config=configs/llama.py:SIZE,HW --plan --devices=8`; docs/benchmarks.md).
GPU_BATCH = {"toy": (64, 64), "35m": (32, 64), "125m": (16, 32), "350m": (8, 16),
             "760m": (8, 8), "1.4b": (4, 8)}


def get_config(arg="toy"):
  size, _, hardware = arg.partition(",")
  hardware = hardware or "cpu"
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
  if hardware not in ("cpu", "a40", "a100", "h100", "h200"):
    raise ValueError(f"unknown hardware {hardware!r}; choose cpu, a40, a100, h100 or h200")
  cfg = base_config()
  d, layers, heads, kv_heads, ff, vocab = SIZES[size]
  cfg.model.update(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, d_ff=ff,
                   vocab_size=vocab)
  if hardware == "cpu":
    cfg.model.update(dtype="float32", attention="auto")
    cfg.data.seq_len = 512
    cfg.train.batch_size = 8
  else:
    cfg.model.update(dtype="bfloat16", attention="cudnn", remat="dots")
    cfg.model.max_seq_len = 2048
    cfg.data.seq_len = 2048
    cfg.train.batch_size_per_device = GPU_BATCH[size][hardware != "a40"]
    cfg.mesh.update(data=1, fsdp=-1, tensor=1)
    cfg.optimizer.muon.ns_dtype = "bfloat16"
  cfg.train.steps = 10000
  cfg.train.hardware = hardware
  return cfg
