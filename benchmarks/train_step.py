"""Training step time and memory on CPU: jaxtrain against HF transformers' LlamaForCausalLM.

    python benchmarks/train_step.py                            # 35M, fp32, AdamW, batch 8 x 512
    python benchmarks/train_step.py --repeats=9                # more alternating bursts
    python benchmarks/train_step.py --burst=1                  # single steps after a pause
    python benchmarks/train_step.py --sides=jax                # jaxtrain only (no PyTorch needed)
    python benchmarks/train_step.py --muon                     # Muon / AdamW step time, 1x and 4x batch
    python benchmarks/train_step.py --xla-flags='--xla_cpu_...' # try an XLA flag on the jaxtrain side
    python benchmarks/train_step.py --glibc-tunables=glibc.malloc.hugetlb=1  # both sides alike

Both sides train the same model (sizes from `--config`, fp32, untied, no dropout) on the same random
batch with AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1, global-norm clipping at 1.0). The peer
is what a PyTorch user writes: `LlamaForCausalLM(config)` (SDPA attention), `F.cross_entropy` on its
logits, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW`. Each side runs in its own worker
process, so the peak RSS reported is that side's alone, and the parent alternates timed bursts of
`--burst` steps between the workers (5 bursts each by default), so whatever else the machine is
doing hits both sides alike: compare the ratio, not the absolute seconds (the table also gives
the ratio within each round, whose spread shows how much the machine moved it). Steps within a
burst run back to back, as in a training loop; the first step of each burst follows the idle
pause and is not counted (on our VM, memory that a step freed and left idle for ~2 s costs much
more kernel time to fault in again than memory reused at once: docs/benchmarks.md). Both workers
get the same environment; `--glibc-tunables` sets GLIBC_TUNABLES for both alike (jaxtrain itself
never changes its process's allocator or environment).
The fp32 matmul peak of each framework (the best median over a few large square matmuls) is
measured the same way, alternating; "of peak" is each side's model FLOP/s
(jaxtrain.model.flops_per_token x tokens / step time) over its own peak.

torch and transformers are imported only by the peer worker (`pip install -e .[hf]`).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PROTOCOL = "@@ "  # Worker replies start with this; anything else on stdout is a library's chatter.


# ---------------------------------------------------------------------------------------------
# Workers: one process per side, commands on stdin, one JSON reply line per command.


def _reply(obj):
  sys.stdout.write(PROTOCOL + json.dumps(obj) + "\n")
  sys.stdout.flush()


def _peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB.


def _tokens(spec):
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(spec["seed"])
  tokens = rng.integers(0, spec["vocab_size"], (spec["batch_size"], spec["seq_len"] + 1))
  return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)


def _serve(step_fn, matmul_fn):
  """The worker loop: `step` times one training step, `matmul N` one N x N fp32 matmul of each
  kind the side runs (`matmul_fn(n)` returns {kind: seconds})."""
  warm = set()
  for line in sys.stdin:
    command = line.split()
    if not command:
      continue
    if command[0] == "step":  # `step N`: N steps back to back, as a training loop runs them.
      each = []
      for _ in range(int(command[1]) if len(command) > 1 else 1):
        start = time.perf_counter()
        loss = step_fn()
        each.append(time.perf_counter() - start)
      counted = each[1:] or each  # The first of a burst follows the idle pause (see --burst).
      _reply({"seconds": sum(counted) / len(counted), "counted": counted, "loss": loss})
    elif command[0] == "matmul":
      n = int(command[1])
      if n not in warm:
        matmul_fn(n)
        warm.add(n)
      _reply({"seconds": matmul_fn(n)})
    elif command[0] == "rss":
      _reply({"peak_rss_mib": _peak_rss_mib()})
    elif command[0] == "quit":
      return


def jax_worker(spec):
  """jaxtrain's own step: make_setup + make_train_step on a one-device mesh, state donated."""
  if spec.get("xla_flags"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + spec["xla_flags"]).strip()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxtrain import config as config_lib, sharding, trainer  # pylint: disable=import-outside-toplevel

  cfg = config_lib.load_config(spec["config"], spec["overrides"])
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  start = time.perf_counter()
  setup = trainer.make_setup(cfg, mesh)
  step = trainer.make_train_step(setup)
  state = setup.init(cfg.train.seed)
  inputs, targets = _tokens(spec)
  batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  holder = {"state": state}

  def step_fn():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))
    return float(metrics["loss"])

  kinds = {"xla": jax.jit(jnp.matmul)}
  matmuls = {}

  def matmul_fn(n):
    if n not in matmuls:
      matmuls[n] = (jax.random.normal(jax.random.key(0), (n, n), jnp.float32),
                    jax.random.normal(jax.random.key(1), (n, n), jnp.float32))
    seconds = {}
    for kind, f in kinds.items():
      start = time.perf_counter()
      f(*matmuls[n]).block_until_ready()
      seconds[kind] = time.perf_counter() - start
    return seconds

  first_loss = step_fn()
  step_fn()  # A second warm-up step: buffers from donation settle.
  _reply({"ready": True, "compile_seconds": compile_seconds, "first_loss": first_loss,
          "version": f"jax {jax.__version__}", "attention": cfg.model.attention,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")})
  _serve(step_fn, matmul_fn)


def torch_worker(spec):
  """The PyTorch peer: HF LlamaForCausalLM, F.cross_entropy, AdamW; eager, as users run it."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  m = spec["model"]
  torch.manual_seed(spec["seed"])
  config = transformers.LlamaConfig(
      vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["d_ff"],
      num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
      num_key_value_heads=m["kv_heads"], head_dim=m["head_dim"],
      max_position_embeddings=max(m["max_seq_len"], spec["seq_len"]), rope_theta=m["rope_theta"],
      rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"], attention_bias=False,
      mlp_bias=False, attention_dropout=0.0, initializer_range=m["init_std"],
      attn_implementation=spec["peer_attention"])
  start = time.perf_counter()
  model = transformers.LlamaForCausalLM(config).to(torch.float32)
  model.train()
  opt = spec["optimizer"]
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], betas=(opt["b1"], opt["b2"]),
                                eps=opt["eps"], weight_decay=opt["weight_decay"])
  inputs, targets = _tokens(spec)
  inputs, targets = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()
  V = m["vocab_size"]

  def step_fn():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1))
    loss.backward()
    if opt["clip_norm"]:
      torch.nn.utils.clip_grad_norm_(model.parameters(), opt["clip_norm"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

  matmuls = {}

  def matmul_fn(n):
    if n not in matmuls:
      g = torch.Generator().manual_seed(0)
      matmuls[n] = (torch.randn(n, n, generator=g), torch.randn(n, n, generator=g))
    a, b = matmuls[n]
    start = time.perf_counter()
    with torch.no_grad():
      torch.matmul(a, b)
    return {"torch": time.perf_counter() - start}

  first_loss = step_fn()
  step_fn()
  _reply({"ready": True, "compile_seconds": time.perf_counter() - start, "first_loss": first_loss,
          "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
          "attention": spec["peer_attention"], "threads": torch.get_num_threads()})
  _serve(step_fn, matmul_fn)


# ---------------------------------------------------------------------------------------------
# The parent: start workers, alternate commands, summarise.


class Worker:

  def __init__(self, name, side, spec):
    self.name, self.side, self.spec = name, side, spec
    env = dict(os.environ)
    if spec.get("glibc_tunables"):
      env["GLIBC_TUNABLES"] = spec["glibc_tunables"]
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--worker={side}", "--spec", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.info = self._read()
    self.steps, self.bursts, self.matmuls = [], [], {}

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith(PROTOCOL):
        return json.loads(line[len(PROTOCOL):])
    raise RuntimeError(f"worker {self.name} exited with code {self.proc.wait()}")

  def ask(self, command):
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


def alternate(workers, repeats, command, record, pause=0.0):
  """`repeats` rounds; each round runs `command` once per worker, starting with a different one.

  `pause` seconds of sleep before each command let the previous worker's idle threads stop
  spinning (OpenMP and Eigen pools busy-wait for a while after a parallel region), so one side's
  leftover spinning is not charged to the other side's step.
  """
  for r in range(repeats):
    for i in range(len(workers)):
      w = workers[(i + r) % len(workers)]
      time.sleep(pause)
      record(w, w.ask(command))


def round_ratios(bursts_a, bursts_b):
  """Side a's median step over side b's, round by round (the bursts of one alternating round).

  The two bursts of a round run back to back, so a slow minute of a shared machine hits both;
  the spread of these ratios shows how far the overall ratio of medians could move.
  """
  return [median(a) / median(b) for a, b in zip(bursts_a, bursts_b)]


def model_spec(cfg):
  from jaxtrain import model as model_lib  # pylint: disable=import-outside-toplevel
  c = model_lib.ModelConfig.from_config(cfg.model)
  return {"vocab_size": c.vocab_size, "d_model": c.d_model, "d_ff": c.d_ff,
          "n_layers": c.n_layers, "n_heads": c.n_heads, "kv_heads": c.kv_heads,
          "head_dim": c.dim_per_head, "max_seq_len": c.max_seq_len, "rope_theta": c.rope_theta,
          "norm_eps": c.norm_eps, "tie_embeddings": c.tie_embeddings, "init_std": c.init_std}, c


def machine():
  name = platform.processor() or platform.machine()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", name).strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return f"{name}, {os.cpu_count()} cores"


def median(values):
  return statistics.median(values) if values else float("nan")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--config", default="configs/llama.py:35m",
                      help="jaxtrain config (its cpu preset: fp32, seq 512, batch 8)")
  parser.add_argument("--batch-size", type=int, default=0, help="0: the config's train.batch_size")
  parser.add_argument("--seq-len", type=int, default=0, help="0: the config's data.seq_len")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed bursts of steps per side (alternating)")
  parser.add_argument("--burst", type=int, default=3,
                      help="steps per timed command, run back to back as in training; all but "
                           "the first (which follows the idle pause) are counted")
  parser.add_argument("--sides", default="jax,torch", help="jax, torch or both")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="jaxtrain config override, e.g. --set model.attention=xla (repeatable)")
  parser.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the jaxtrain worker")
  parser.add_argument("--glibc-tunables", default="",
                      help="GLIBC_TUNABLES for both workers alike, e.g. glibc.malloc.hugetlb=1")
  parser.add_argument("--peer-attention", default="sdpa", help="HF attn_implementation")
  parser.add_argument("--matmul-sizes", default="2048,4096",
                      help="square fp32 matmul sizes for the peak; the best median counts")
  parser.add_argument("--matmul-repeats", type=int, default=5)
  parser.add_argument("--pause", type=float, default=2.0,
                      help="seconds of idle before each timed command (see `alternate`)")
  parser.add_argument("--muon", action="store_true",
                      help="instead: jaxtrain Muon vs AdamW step time at 1x and 4x the batch")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--spec", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.burst < 1 or args.repeats < 1:
    parser.error(f"--burst and --repeats must be >= 1, got {args.burst} and {args.repeats}")
  return args


def base_spec(args):
  from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
  overrides = [tuple(s.split("=", 1)) for s in args.set]
  if args.batch_size:
    overrides.append(("train.batch_size", str(args.batch_size)))
  if args.seq_len:
    overrides.append(("data.seq_len", str(args.seq_len)))
  cfg = config_lib.load_config(args.config, overrides)
  model, model_cfg = model_spec(cfg)
  o = cfg.optimizer
  spec = {"config": args.config, "overrides": overrides, "seed": 0,
          "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
          "vocab_size": model["vocab_size"], "model": model, "xla_flags": args.xla_flags,
          "peer_attention": args.peer_attention, "glibc_tunables": args.glibc_tunables,
          "optimizer": {"lr": o.lr, "b1": o.b1, "b2": o.b2, "eps": o.eps,
                        "weight_decay": o.weight_decay, "clip_norm": o.clip_norm}}
  return spec, cfg, model_cfg


def with_overrides(spec, *pairs):
  return {**spec, "overrides": spec["overrides"] + list(pairs)}


def header(args, cfg, model_cfg, flops_per_token, tokens):
  load = os.getloadavg()
  return [
      f"date {datetime.date.today()}, {machine()}, load average {load[0]:.2f} at start",
      f"config {args.config} ({model_cfg.n_layers} layers, d={model_cfg.d_model}, "
      f"{model_cfg.n_heads} heads, ffn {model_cfg.d_ff}, vocab {model_cfg.vocab_size}, "
      f"dtype {cfg.model.dtype}), batch {cfg.train.batch_size} x {cfg.data.seq_len} = {tokens} "
      f"tokens, {flops_per_token / 1e6:.1f} MFLOP/token (jaxtrain.model.flops_per_token), "
      f"{args.repeats} alternating bursts of {args.burst} steps per side "
      f"({args.repeats * max(args.burst - 1, 1)} counted)",
      f"command: python benchmarks/train_step.py {' '.join(sys.argv[1:])}".rstrip(),
  ]


def run_comparison(args):
  from jaxtrain import model as model_lib  # pylint: disable=import-outside-toplevel
  spec, cfg, model_cfg = base_spec(args)
  spec = with_overrides(spec, ("optimizer.name", "adamw"))
  tokens = spec["batch_size"] * spec["seq_len"]
  flops_per_token = model_lib.flops_per_token(model_cfg, spec["seq_len"])
  lines = header(args, cfg, model_cfg, flops_per_token, tokens)
  sides = [s.strip() for s in args.sides.split(",") if s.strip()]
  names = {"jax": "jaxtrain", "torch": "PyTorch + HF"}
  workers = []
  try:
    for side in sides:
      workers.append(Worker(names[side], side, spec))
      print(f"{names[side]} ready: {workers[-1].info}", file=sys.stderr)
    alternate(workers, args.repeats, f"step {args.burst}",
              lambda w, r: (w.steps.extend(r["counted"]), w.bursts.append(r["counted"])),
              args.pause)
    sizes = [int(n) for n in args.matmul_sizes.split(",") if n]
    for n in sizes:
      alternate(workers, args.matmul_repeats, f"matmul {n}",
                lambda w, r, n=n: [w.matmuls.setdefault((n, kind), []).append(t)
                                   for kind, t in r["seconds"].items()], args.pause)
    rss = {w.name: w.ask("rss")["peak_rss_mib"] for w in workers}
  finally:
    for w in workers:
      w.close()

  rows = {}
  for w in workers:
    step = median(w.steps)
    peaks = {(n, kind): 2 * n ** 3 / median(ts) for (n, kind), ts in w.matmuls.items()}
    best_n = max(peaks, key=peaks.get)
    achieved = flops_per_token * tokens / step
    rows[w.name] = {
        "step": step, "spread": (min(w.steps), max(w.steps)), "tokens_per_sec": tokens / step,
        "tflops": achieved / 1e12, "peak": peaks[best_n] / 1e12, "peak_n": best_n,
        "of_peak": achieved / peaks[best_n], "rss": rss[w.name], "info": w.info,
        "first_loss": w.info["first_loss"]}
  print("\n".join(lines))
  print()
  cols = list(rows)
  ratio = len(cols) == 2
  print("| | " + " | ".join(cols) + (f" | {cols[0]} / {cols[1]} |" if ratio else " |"))
  print("|---" * (len(cols) + 1 + ratio) + "|")

  def row(label, key, fmt, ratio_ok=True):
    values = [rows[c][key] for c in cols]
    cells = [fmt(v) for v in values]
    extra = [f"{values[0] / values[1]:.2f}" if ratio_ok else ""] if ratio else []
    print(f"| {label} | " + " | ".join(cells + extra) + " |")

  row("step time, median (s)", "step", lambda v: f"{v:.2f}")
  row("step time, min - max (s)", "spread", lambda v: f"{v[0]:.2f} - {v[1]:.2f}", False)
  if ratio:
    per_round = round_ratios(workers[0].bursts, workers[1].bursts)
    print(f"| step time ratio of each round, median (min - max) | | | "
          f"{median(per_round):.2f} ({min(per_round):.2f} - {max(per_round):.2f}) |")
  row("tokens/s", "tokens_per_sec", lambda v: f"{v:,.0f}")
  row("model TFLOP/s", "tflops", lambda v: f"{v:.3f}")
  row("fp32 matmul peak, measured (TFLOP/s)", "peak", lambda v: f"{v:.3f}")
  row("matmul of that peak", "peak_n", lambda v: f"{v[0]}^2 {v[1]}", False)
  row("model FLOP/s / own matmul peak", "of_peak", lambda v: f"{100 * v:.0f}%")
  row("peak RSS (MiB)", "rss", lambda v: f"{v:,.0f}")
  row("loss of the first step", "first_loss", lambda v: f"{v:.4f}", False)
  print()
  for c in cols:
    print(f"- {c}: {rows[c]['info']['version']}; attention {rows[c]['info']['attention']}"
          + (f"; XLA_FLAGS={rows[c]['info']['xla_flags']!r}" if rows[c]['info'].get('xla_flags')
             else "")
          + (f"; GLIBC_TUNABLES={rows[c]['info']['glibc_tunables']}"
             if rows[c]['info'].get('glibc_tunables') else ""))
  print(f"- load average at the end: {os.getloadavg()[0]:.2f}")


def ns_flops_per_step(cfg, model_cfg):
  """Newton-Schulz matmul FLOPs of one Muon update: every hidden matrix, layers as batch."""
  from jaxtrain import model as model_lib, optim  # pylint: disable=import-outside-toplevel
  from jaxtrain.optim import routing  # pylint: disable=import-outside-toplevel
  _, params = model_lib.params_of(model_lib.abstract_model(model_cfg))
  hidden = tuple(tuple(row) for row in cfg.optimizer.muon.hidden)
  total = 0
  for path, shape, group in routing.routing_table(params, cfg.optimizer):
    if group != routing.MUON:
      continue
    layout = routing.hidden_layout(path, hidden)
    fan_in, fan_out = routing.fans(shape, layout)
    batch = 1
    for d, a in zip(shape, layout):
      batch *= d if a == "b" else 1
    total += batch * optim.ns_flops(fan_in, fan_out, cfg.optimizer.muon.ns_steps)
  return total


def run_muon(args):
  from jaxtrain import model as model_lib  # pylint: disable=import-outside-toplevel
  spec, cfg, model_cfg = base_spec(args)
  try:
    from jaxtrain import optim  # pylint: disable=import-outside-toplevel
    cfg.optimizer.name = "muon"
    optim.build_optimizer(cfg.optimizer, cfg.train.steps)
    ns = ns_flops_per_step(cfg, model_cfg)
  except Exception as e:  # pylint: disable=broad-except
    print(f"Muon is not available here ({type(e).__name__}: {e}); nothing to compare.")
    return
  flops_per_token = model_lib.flops_per_token(model_cfg, spec["seq_len"])
  print("\n".join(header(args, cfg, model_cfg, flops_per_token,
                         spec["batch_size"] * spec["seq_len"])))
  print()
  print("| batch | AdamW step (s) | Muon step (s) | Muon / AdamW | NS share of step FLOPs "
        "(theory) | model + NS FLOPs / step |")
  print("|---|---|---|---|---|---|")
  for mult in (1, 4):
    batch = spec["batch_size"] * mult
    s = {**spec, "batch_size": batch}
    s = with_overrides(s, ("train.batch_size", str(batch)))
    workers = []
    try:
      for name in ("adamw", "muon"):
        workers.append(Worker(name, "jax", with_overrides(s, ("optimizer.name", name))))
      alternate(workers, args.repeats, "step", lambda w, r: w.steps.append(r["seconds"]),
                args.pause)
    finally:
      for w in workers:
        w.close()
    adamw, muon = median(workers[0].steps), median(workers[1].steps)
    model_flops = flops_per_token * batch * spec["seq_len"]
    print(f"| {batch} x {spec['seq_len']} | {adamw:.2f} | {muon:.2f} | {muon / adamw:.3f} | "
          f"{100 * ns / (model_flops + ns):.1f}% | {(model_flops + ns) / 1e9:.0f} GFLOP |",
          flush=True)
  print(f"\nNewton-Schulz: {cfg.optimizer.muon.ns_steps} steps, {ns / 1e9:.1f} GFLOP per update "
        f"(jaxtrain.optim.ns_flops over the hidden matrices); load average at the end "
        f"{os.getloadavg()[0]:.2f}")


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  if args.worker:
    spec = json.loads(args.spec)
    (jax_worker if args.worker == "jax" else torch_worker)(spec)
    return
  path, _, arg = args.config.partition(":")
  if os.path.exists(path):  # Workers run in the repository root; keep the user's path valid.
    args.config = os.path.abspath(path) + (":" + arg if arg else "")
  if args.muon:
    run_muon(args)
  else:
    run_comparison(args)


if __name__ == "__main__":
  main()
