"""Does a freed slot slow down the requests beside it? Decode speed of a request after a long
request in the slot below it has ended, against the same after a short one.

    python benchmarks/engine_slots.py                     # 35M fp32, 8 slots, context 1024
    python benchmarks/engine_slots.py --size=toy --long=300 --repeats=2

One warm engine (`Engine.warmup`, as the server runs it). Each scenario, alternating, `--repeats`
times: request A (a random 64-token prompt) takes slot 0; when A has 100 tokens left, B (64
tokens, `--new` new) takes slot 1, so B's steps compute rows 0-1 (`model.decode_rows`) and run on
after A ends. `long`: A asks for `--long` tokens; `short`: A asks for 110. Reported: B's time per
token after A ended (from a quarter of the way in, so no prefill or hand-over is in it), median
over repeats, and long / short. On XLA:CPU a step reads the cache window holding the longest of
its rows, so a freed slot that kept its length (or kept growing) would make the long scenario
read a window of ~--long positions for B's whole life; with `generate.release` both read B's own.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def after_a_ends(engine, engine_lib, prompt, long, new):
  """Seconds per token of B once A (in slot 0, `long` tokens) has ended."""
  a = engine.submit(engine_lib.Request(prompt=prompt(), max_tokens=long))
  while len(a.tokens) < long - 100:
    engine.step()
  b = engine.submit(engine_lib.Request(prompt=prompt(), max_tokens=new))
  marks = []
  while b.finish_reason is None:
    engine.step()
    if a.finish_reason is not None:
      marks.append((time.perf_counter(), len(b.tokens)))
  engine.run_until_idle()
  (t0, n0), (t1, n1) = marks[len(marks) // 4], marks[-1]
  return (t1 - t0) / (n1 - n0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="35m", help="a configs/llama.py size (default 35m)")
  p.add_argument("--slots", type=int, default=8)
  p.add_argument("--context", type=int, default=1024, help="the engine's cache length")
  p.add_argument("--long", type=int, default=700, help="A's tokens in the long scenario")
  p.add_argument("--new", type=int, default=300, help="B's new tokens")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  if not 110 < args.long <= args.context - 64 or args.new + 64 > args.context:
    p.error("need 110 < --long <= --context - 64 and --new + 64 <= --context")

  import jax  # pylint: disable=import-outside-toplevel
  from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxtrain import model as model_lib  # pylint: disable=import-outside-toplevel
  from jaxtrain.serving import engine as engine_lib  # pylint: disable=import-outside-toplevel

  cfg = config_lib.load_config(f"configs/llama.py:{args.size}")
  c = model_lib.ModelConfig.from_config(
      {**cfg.model.to_dict(), "dtype": "float32", "param_dtype": "float32",
       "max_seq_len": max(cfg.model.max_seq_len, args.context)})
  engine = engine_lib.Engine(model_lib.create(c, 0), slots=args.slots, max_len=args.context)
  engine.warmup(prompt_lens=(64,))
  rng = np.random.default_rng(0)
  prompt = lambda: rng.integers(1, c.vocab_size, 64).tolist()
  times = {"long": [], "short": []}
  for _ in range(args.repeats):
    for name, a_tokens in (("long", args.long), ("short", 110)):
      times[name].append(after_a_ends(engine, engine_lib, prompt, a_tokens, args.new))
  long, short = (statistics.median(times[k]) for k in ("long", "short"))
  print(f"# engine slots, {args.size} fp32, {args.slots} slots, context {args.context}, "
        f"jax {jax.__version__} ({jax.default_backend()}), warm rows {engine.warm_rows}")
  print(f"B's ms per token after A ended: long A ({args.long} tokens) {long * 1e3:.2f}, short A "
        f"(110) {short * 1e3:.2f}, long / short {long / short:.2f}")
  print("# per repeat (ms): " + ", ".join(
      f"{k} " + " ".join(f"{t * 1e3:.2f}" for t in v) for k, v in times.items()))


if __name__ == "__main__":
  main()
