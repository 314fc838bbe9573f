"""Decode speed on CPU: jaxtrain's serving functions against HF transformers' `generate`.

    python benchmarks/decode.py                       # 35M, fp32, prompt 64, 128 new, batch 1 and 8
    python benchmarks/decode.py --repeats=7           # more interleaved repeats
    python benchmarks/decode.py --batches=1 --sides=jax   # jaxtrain only (no PyTorch needed)
    python benchmarks/decode.py --size=toy --new=64   # another configs/llama.py size
    python benchmarks/decode.py --size=1.4b --dtype=bfloat16 --sides=jax   # on a GPU
    python benchmarks/decode.py --sides=jax --windows=eighths   # CPU's cache windows anywhere

Both sides decode the same weights: a random jaxtrain model (configs/llama.py sizes, untied, fp32
unless `--dtype`) is written as an HF LLaMA directory with `jaxtrain.convert.save_hf` and loaded by
`transformers.LlamaForCausalLM.from_pretrained` (SDPA attention). Each side gets the same random
prompts of `--prompt` tokens and produces exactly `--new` tokens greedily per row:

  jaxtrain: the jitted functions the serving engine runs (`serving.generate.prefill`, `insert`,
            then `decode` in chunks of `--chunk` steps per dispatch, the engine's default), the
            cache sized as `jaxtrain.generate` sizes it (a power of two >= prompt + new);
  HF:       `model.generate(..., do_sample=False, use_cache=True, min_new_tokens=max_new_tokens)`
            (its dynamic KV cache), under `torch.no_grad`.

Tokens/s = batch x new tokens / wall time of the whole generation (prefill included), one side
after the other for each batch and repeat, so load on the shared machine hits both alike: compare
the ratio. Both sides use every core (XLA's CPU client does; `torch.set_num_threads` is set to the
same count). Decode memory traffic: per decode step jaxtrain reads every weight once (the
embedding table only at B rows) plus the cache prefix it attends over (on CPU the smallest of
`model.cache_windows(S)` holding the longest row, else all S positions); GB/s = those
bytes / (decode time / steps), against the machine's read bandwidth measured in the same run
(the best median of a large jax sum and a numpy copy; a copy's bytes count read and write).
HF's greedy tokens are compared with ours as a check of the conversion (random weights have near
ties, so a late divergence in fp32 is possible; the report says how many rows agree).

On a GPU the bandwidth to compare with is also the device table's (`jaxtrain.hardware`, dense
datasheet figures), printed when the device is in it. `--windows=eighths` makes decode read
XLA:CPU's cache windows (`model.cache_windows`) on any platform: run it beside the default on a
GPU to see whether windows would pay there (GPUs read the whole cache by default).
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _bandwidth_gbs(mib=512, repeats=5):
  """The machine's memory read bandwidth (GB/s): best median of a jax sum and a numpy copy."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  n = mib * 2**20 // 4
  x = jnp.ones((n,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  t_sum = []
  for _ in range(repeats):
    start = time.perf_counter()
    total(x).block_until_ready()
    t_sum.append(time.perf_counter() - start)
  a = np.ones((n,), np.float32)
  b = np.empty_like(a)
  t_copy = []
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(b, a)
    t_copy.append(time.perf_counter() - start)
  return {"jax_sum_read": a.nbytes / statistics.median(t_sum) / 1e9,
          "numpy_copy_read_write": 2 * a.nbytes / statistics.median(t_copy) / 1e9}


class JaxSide:
  """jaxtrain's serving path: prefill, insert, `decode` in chunks (what the engine dispatches)."""

  def __init__(self, model, batch, prompt_len, new, chunk):
    from jaxtrain import model as model_lib  # pylint: disable=import-outside-toplevel
    from jaxtrain.serving import generate as gen  # pylint: disable=import-outside-toplevel
    self.gen = gen
    self.c = model.config
    self.weights = model_lib.serving_weights(model)
    self.batch, self.prompt_len, self.new, self.chunk = batch, prompt_len, new, chunk
    self.S = gen.bucket(prompt_len + new)
    self.T = gen.bucket(prompt_len)
    self.sampling = gen.Sampling.make([0.0] * batch, [0] * batch, [1.0] * batch, range(batch))
    self.state = gen.DecodeState.empty(self.c, batch, self.S)

  def run(self, prompts_BP):
    """(tokens [B, new], seconds in all, seconds in decode, decode steps)."""
    gen = self.gen
    tokens_BT = np.zeros((self.batch, self.T), np.int32)
    tokens_BT[:, :self.prompt_len] = prompts_BP
    lengths_B = np.full((self.batch,), self.prompt_len, np.int32)
    steps = -(-(self.new - 1) // self.chunk) * self.chunk
    start = time.perf_counter()
    first_B, prefix = gen.prefill(self.c, self.weights, tokens_BT, lengths_B, self.sampling)
    self.state = gen.insert(self.state, prefix, first_B, self.sampling, 0)
    first_B = np.asarray(first_B)  # what the engine reads at once (the first token's latency)
    middle = time.perf_counter()
    chunks = []
    for _ in range(steps // self.chunk):
      self.state, tokens_SB = gen.decode(self.c, self.weights, self.state, self.chunk)
      chunks.append(tokens_SB)
    chunks = [np.asarray(t) for t in chunks]
    end = time.perf_counter()
    out_BN = np.concatenate([first_B[:, None]] + [t.T for t in chunks], axis=1)[:, :self.new]
    return out_BN, end - start, end - middle, steps

  def bytes_per_step(self, steps):
    """Mean bytes a decode step reads: the weights, and the cache prefix attention reads (the
    window holding the longest row, `model.cache_windows`) over the `steps` steps run."""
    from jaxtrain import model as model_lib  # pylint: disable=import-outside-toplevel
    c = self.c
    windows = model_lib.cache_windows(self.S)
    read = [min(w for w in windows if w >= min(self.prompt_len + i, self.S)) for i in range(steps)]
    itemsize = self.state.cache.ks_BKSH[0].dtype.itemsize
    per_position = 2 * c.n_layers * self.batch * c.kv_heads * c.dim_per_head * itemsize
    kv = per_position * sum(read) / len(read)
    return model_lib.serving_bytes_per_step(self.weights, self.batch) + kv


class HFSide:

  def __init__(self, hf_dir, batch, prompt_len, new, threads, dtype):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)
    self.torch = torch
    self.model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, torch_dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
    self.batch, self.prompt_len, self.new = batch, prompt_len, new
    self.version = f"torch {torch.__version__}, transformers {transformers.__version__}"

  def run(self, prompts_BP):
    torch = self.torch
    ids = torch.from_numpy(prompts_BP.astype(np.int64))
    start = time.perf_counter()
    with torch.no_grad():
      out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                use_cache=True, max_new_tokens=self.new,
                                min_new_tokens=self.new, pad_token_id=0)
    return out[:, self.prompt_len:].numpy(), time.perf_counter() - start


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="35m", help="a configs/llama.py size (default 35m)")
  p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
  p.add_argument("--new", type=int, default=128, help="new tokens per row")
  p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median reported)")
  p.add_argument("--chunk", type=int, default=8, help="jaxtrain decode steps per dispatch")
  p.add_argument("--sides", default="jax,hf", help="jax, hf or both")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="weights, compute and cache dtype of both sides")
  p.add_argument("--windows", default="auto", choices=("auto", "eighths"),
                 help="auto: the platform's model.cache_windows; eighths: XLA:CPU's on any device")
  args = p.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel
  from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxtrain import convert, hardware  # pylint: disable=import-outside-toplevel
  from jaxtrain import model as model_lib  # pylint: disable=import-outside-toplevel
  from jaxtrain.serving import generate as gen  # pylint: disable=import-outside-toplevel

  if args.windows == "eighths":  # a measurement switch: the CPU windows on this platform
    cpu_windows = model_lib.cache_windows
    model_lib.cache_windows = lambda S, platform=None: cpu_windows(S, "cpu")
  cfg = config_lib.load_config(f"configs/llama.py:{args.size}")
  c = model_lib.ModelConfig.from_config(
      {**cfg.model.to_dict(), "dtype": args.dtype, "param_dtype": args.dtype,
       "max_seq_len": max(cfg.model.max_seq_len, args.prompt + args.new)})
  model = model_lib.create(c, seed=args.seed)
  sides = args.sides.split(",")
  batches = [int(b) for b in args.batches.split(",")]
  threads = os.cpu_count()
  rng = np.random.default_rng(args.seed)
  prompts = {b: rng.integers(1, c.vocab_size, (b, args.prompt)).astype(np.int32) for b in batches}

  print(f"# decode benchmark, {datetime.date.today()}, {platform.node()}, {threads} cores, "
        f"jax {jax.__version__} ({jax.default_backend()})")
  print(f"# model {args.size}: {model_lib.param_counts(c)['total'] / 1e6:.1f}M params "
        f"{args.dtype}, prompt {args.prompt}, {args.new} new tokens, greedy, chunk {args.chunk}, "
        f"cache windows {model_lib.cache_windows(gen.bucket(args.prompt + args.new))}")
  bw = _bandwidth_gbs()
  print(f"# memory bandwidth: jax sum {bw['jax_sum_read']:.1f} GB/s read, numpy copy "
        f"{bw['numpy_copy_read_write']:.1f} GB/s read+write")
  peak = max(bw.values())
  table = hardware.device_bandwidth_gbs()
  if table:
    print(f"# {jax.devices()[0].device_kind}: {table:.0f} GB/s in jaxtrain.hardware's table")

  tmp = tempfile.TemporaryDirectory()
  jax_sides, hf_sides = {}, {}
  for b in batches:
    if "jax" in sides:
      jax_sides[b] = JaxSide(model, b, args.prompt, args.new, args.chunk)
      jax_sides[b].run(prompts[b])  # compile
    if "hf" in sides:
      if not hf_sides:
        convert.save_hf(model, c, tmp.name)
      hf_sides[b] = HFSide(tmp.name, b, args.prompt, args.new, threads, args.dtype)
      hf_sides[b].run(prompts[b])  # warm up
  if hf_sides:
    print(f"# peer: {next(iter(hf_sides.values())).version}, torch threads {threads}")

  times = {(s, b): [] for s in ("jax", "hf") for b in batches}
  decode_times = {b: [] for b in batches}
  agree = {}
  steps = {}
  for _ in range(args.repeats):
    for b in batches:
      if b in jax_sides:
        ours, t, t_dec, steps[b] = jax_sides[b].run(prompts[b])
        times["jax", b].append(t)
        decode_times[b].append(t_dec)
      if b in hf_sides:
        theirs, t = hf_sides[b].run(prompts[b])
        times["hf", b].append(t)
        if b in jax_sides:
          agree[b] = (int(sum((ours[i] == theirs[i]).all() for i in range(b))),
                      float((ours == theirs).mean()))

  print()
  print("| batch | jaxtrain tok/s | HF tok/s | ratio | jaxtrain step ms | GB/s | of measured bw"
        " | greedy rows equal |")
  print("|---|---|---|---|---|---|---|---|")
  for b in batches:
    row = [str(b)]
    tj = statistics.median(times["jax", b]) if times["jax", b] else None
    th = statistics.median(times["hf", b]) if times["hf", b] else None
    row.append(f"{b * args.new / tj:.0f}" if tj else "-")
    row.append(f"{b * args.new / th:.0f}" if th else "-")
    row.append(f"{th / tj:.2f}x" if tj and th else "-")
    if tj:
      step = statistics.median(decode_times[b]) / steps[b]
      gbs = jax_sides[b].bytes_per_step(steps[b]) / step / 1e9
      row += [f"{step * 1e3:.2f}", f"{gbs:.1f}", f"{gbs / peak:.0%}"]
    else:
      row += ["-", "-", "-"]
    row.append(f"{agree[b][0]}/{b} ({agree[b][1]:.0%} of tokens)" if b in agree else "-")
    print("| " + " | ".join(row) + " |")
  spread = {k: (min(v), max(v)) for k, v in times.items() if v}
  print()
  print("# per-repeat seconds (min, max): " + ", ".join(
      f"{s} b{b} {lo:.2f}-{hi:.2f}" for (s, b), (lo, hi) in spread.items()))
  tmp.cleanup()


if __name__ == "__main__":
  main()
