"""Regenerate the HF LLaMA reference fixtures that `tests/test_convert.py` checks against.

  pip install -e ".[hf]" && python tests/make_hf_fixtures.py

The test suite never imports torch or transformers: this script is the only place they run. It
builds small random `LlamaForCausalLM`s in fp32 with the eager attention implementation, saves each
with `save_pretrained` (safetensors) into `tests/fixtures/hf/<name>/`, and stores the logits
transformers computes for a fixed token batch in `reference.npz` (`tokens`, `logits`). The
configurations cover the conversion's branches: multi-head and grouped-query attention, tied
embeddings, llama3 rope scaling, an explicit head_dim that is not d_model / n_heads, and a
checkpoint sharded across several files with an index.

Weights are redrawn at unit scale (norm scales around 1, not exactly 1) so that logits spread over
several units: a transposed or swapped tensor then moves the logits far beyond the tolerance,
whereas HF's default 0.02 init gives near-uniform logits that hide such mistakes.
"""

import json
import os
import shutil

import numpy as np
import torch
import transformers

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
BATCH, SEQ = 2, 12

# name -> (LlamaConfig kwargs, save_pretrained max_shard_size or None)
FIXTURES = {
    "mha": (dict(vocab_size=128, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False), None),
    "gqa_sharded": (dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=10000.0, max_position_embeddings=64,
                         tie_word_embeddings=False), "40KB"),
    "tied": (dict(vocab_size=112, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=3, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True), None),
    "llama3_rope": (dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         rope_theta=500000.0, max_position_embeddings=128,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=16),
                         tie_word_embeddings=False), None),
    # head_dim 16 with 4 heads: the attention width 64 differs from hidden_size 32.
    "head_dim": (dict(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
                      tie_word_embeddings=False), None),
}


def randomize_(model, generator):
  """Unit-scale weights: matrices and embeddings ~ N(0, 1/d_in), norms ~ 1 + N(0, 0.1).

  Embeddings use 1/hidden_size too, so that a tied head gives logits of unit scale as well."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
      else:
        p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)


def make(name, kwargs, max_shard_size, seed):
  out_dir = os.path.join(FIXTURES_DIR, name)
  shutil.rmtree(out_dir, ignore_errors=True)
  config = transformers.LlamaConfig(attn_implementation="eager", **kwargs)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
  randomize_(model, torch.Generator().manual_seed(seed))
  if config.tie_word_embeddings:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

  save_kwargs = {}
  if max_shard_size is not None:
    save_kwargs["max_shard_size"] = max_shard_size
  if int(transformers.__version__.split(".")[0]) < 5:
    save_kwargs["safe_serialization"] = True  # Always on (and the argument gone) from v5.
  model.save_pretrained(out_dir, **save_kwargs)

  tokens_BT = np.random.default_rng(seed).integers(0, config.vocab_size, (BATCH, SEQ))
  with torch.no_grad():
    logits_BTV = model(torch.from_numpy(tokens_BT)).logits.float().numpy()
  np.savez(os.path.join(out_dir, "reference.npz"), tokens=tokens_BT.astype(np.int32),
           logits=logits_BTV.astype(np.float32))
  files = sorted(os.listdir(out_dir))
  size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
  print(f"{name:<12} {size / 1024:7.1f} KiB  logits std {logits_BTV.std():.2f}  {files}")
  return size


def main():
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  os.makedirs(FIXTURES_DIR, exist_ok=True)
  total = sum(make(name, kwargs, shard, seed)
              for seed, (name, (kwargs, shard)) in enumerate(FIXTURES.items()))
  with open(os.path.join(FIXTURES_DIR, "VERSIONS.json"), "w") as f:
    json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f, indent=2)
  print(f"total {total / 1024:.1f} KiB in {FIXTURES_DIR}")


if __name__ == "__main__":
  main()
