"""Muon vs AdamW: the same model on the same tokens, a small lr sweep each, one plot (issue 5).

  python benchmarks/muon_vs_adamw.py                     # 35M, the full experiment (hours on a CPU)
  python benchmarks/muon_vs_adamw.py --size=default --steps=120 --batch-size=8 --seq-len=128 \
      --eval-every=15 --eval-batches=4                   # a reduced version (minutes on a CPU)
  python benchmarks/muon_vs_adamw.py ... --config.optimizer.muon.ns_coeffs=polar_express

For every (optimizer, lr) it trains one run with `jaxtrain.train` in `OUT_DIR/<optimizer>-lr<lr>`.
All runs share the model, data order (`train.seed`), batch, schedule (cosine, linear warm-up over
~10% of the steps unless `--warmup-steps`), weight decay and clipping; only `optimizer.name` and
`optimizer.lr` differ. Under Muon with `shape_scaling='rms_match'` (set here) each Muon update has
the RMS of a typical AdamW update and the AdamW group (embedding, head, norms) takes the same lr, so
one lr grid means the same thing for both optimizers.

Then it reads every run's `metrics.jsonl`, picks the best lr of each optimizer by final validation
loss, and reports for every run the first evaluation step whose validation loss is <= the final
validation loss of the best AdamW run ("steps to AdamW's final val loss"; its resolution is
`--eval-every`). It prints a markdown table, writes it with the machine and the command to
`OUT_DIR/results.md` (and the numbers to `results.json`), and draws `OUT_DIR/curves.png`.

Every value the comparison relies on is set here explicitly rather than taken from the config file,
because config files get retuned (configs/default.py in particular) and a rerun must mean the same
experiment. `--config.KEY=VALUE` (as on the `jaxtrain` CLI) overrides anything else, for all runs.

A run whose workdir holds `done.json` with the same config (checkpointing aside) is skipped, so
an interrupted sweep is resumed by re-running the same command; an unfinished run resumes from its
last checkpoint if it has one (`--checkpoint-every`), else starts over.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_SIZES = ("toy", "35m", "125m", "350m", "760m", "1.4b")
OPTIMIZERS = ("adamw", "muon")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="35m",
                 help=f"configs/llama.py size ({', '.join(LLAMA_SIZES)}) or 'default' "
                      "(configs/default.py)")
  p.add_argument("--hardware", default="cpu", help="configs/llama.py hardware (cpu, h100, ...)")
  p.add_argument("--steps", type=int, default=750,
                 help="default: ~one pass over the embedded corpus at 35M (8 x 512 tokens a step)")
  p.add_argument("--batch-size", type=int, default=8, help="global batch, in sequences")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--adamw-lrs", default="3e-4,1e-3,3e-3")
  p.add_argument("--muon-lrs", default="1e-3,3e-3,1e-2")
  p.add_argument("--warmup-steps", type=int, default=-1, help="-1: 10%% of --steps")
  p.add_argument("--weight-decay", type=float, default=0.1)
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--eval-batches", type=int, default=8,
                 help="validation batches of --batch-size sequences per evaluation")
  p.add_argument("--log-every", type=int, default=0, help="train-loss logging; 0: steps // 200")
  p.add_argument("--seed", type=int, default=0, help="init and data order, the same for every run")
  p.add_argument("--max-docs", type=int, default=0, help="first N corpus documents; 0: all")
  p.add_argument("--source", default="default", help="data.source (default: the embedded corpus)")
  p.add_argument("--checkpoint-every", type=int, default=10 ** 9,
                 help="default: only at the end (checkpoints are for resuming, not the result)")
  p.add_argument("--out-dir", default="runs/muon_vs_adamw")
  p.add_argument("--plot-only", action="store_true", help="train nothing; report what is there")
  args, rest = p.parse_known_args(argv)
  args.overrides = []
  for item in rest:
    key, sep, value = item.partition("=")
    if not key.startswith("--config.") or not sep:
      p.error(f"unrecognized argument {item!r} (overrides are --config.KEY=VALUE)")
    args.overrides.append((key[len("--config."):], value))
  args.lrs = {"adamw": _lrs(p, "--adamw-lrs", args.adamw_lrs),
              "muon": _lrs(p, "--muon-lrs", args.muon_lrs)}
  if args.size != "default" and args.size not in LLAMA_SIZES:
    p.error(f"--size {args.size!r}: choose default or one of {', '.join(LLAMA_SIZES)}")
  for name in ("steps", "batch_size", "seq_len", "eval_batches"):
    if getattr(args, name) <= 0:
      p.error(f"--{name.replace('_', '-')} must be positive")
  return args


def _lrs(p, flag, text):
  try:
    lrs = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    p.error(f"{flag} {text!r}: expected a comma-separated list of numbers")
  if not lrs or any(lr <= 0 for lr in lrs):
    p.error(f"{flag} {text!r}: give at least one positive lr")
  return lrs


def run_name(optimizer, lr):
  return f"{optimizer}-lr{lr:g}"


def build_config(args, optimizer, lr):
  """The config of one run: the size's model, everything the comparison depends on set here."""
  import jaxtrain  # pylint: disable=import-outside-toplevel
  from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
  if args.size == "default":
    spec = os.path.join(REPO, "configs", "default.py")
  else:
    spec = f"{os.path.join(REPO, 'configs', 'llama.py')}:{args.size},{args.hardware}"
  cfg = jaxtrain.load_config(spec)
  cfg.data.source = args.source
  cfg.data.seq_len = args.seq_len
  cfg.data.max_docs = args.max_docs
  cfg.model.max_seq_len = max(cfg.model.max_seq_len, args.seq_len)
  o = cfg.optimizer
  o.name = optimizer
  o.lr = lr
  o.schedule = "cosine"
  o.min_lr_ratio = 0.1
  o.warmup_steps = (args.warmup_steps if args.warmup_steps >= 0
                    else max(1, round(0.1 * args.steps)))
  o.weight_decay = args.weight_decay
  o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
  o.clip_norm = 1.0
  o.muon.shape_scaling = "rms_match"
  o.muon.rms_scale = 0.2
  o.muon.adam_lr = None  # The AdamW group of a Muon run follows the swept lr.
  o.muon.adam_weight_decay = None
  cfg.train.update(steps=args.steps, batch_size=args.batch_size, microbatches=1, seed=args.seed,
                   eval_every=args.eval_every, eval_batches=args.eval_batches,
                   log_every=args.log_every or max(1, args.steps // 200), progress_bar=False)
  cfg.checkpoint.every = args.checkpoint_every
  cfg.checkpoint.keep = 1
  for key, value in args.overrides:
    config_lib.apply_override(cfg, key, value)
  return cfg


def read_metrics(workdir):
  """(train, validation) as sorted [(step, record)]; a step logged twice keeps its last record
  (a run resumed from a checkpoint logs again the steps after it)."""
  train, val = {}, {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return [], []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      r = json.loads(line)
      if r.get("split") == "validation":
        val[r["step"]] = r
      elif "loss" in r and "split" not in r:
        train[r["step"]] = r
  return sorted(train.items()), sorted(val.items())


def train_all(args, runs):
  """Train every run not already finished with the same config; returns {name: wall seconds}."""
  import jaxtrain  # pylint: disable=import-outside-toplevel
  from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
  configs = {name: build_config(args, opt, lr) for name, (opt, lr) in runs.items()}
  for cfg in configs.values():  # Every config is checked before the first run spends an hour.
    config_lib.validate(cfg)
  walls = {}
  for i, (name, cfg) in enumerate(configs.items()):
    workdir = os.path.join(args.out_dir, name)
    done_path = os.path.join(workdir, "done.json")
    # Checkpointing changes no result, so `--checkpoint-every` may differ on a re-run.
    cfg_dict = {k: v for k, v in json.loads(config_lib.to_json(cfg)).items() if k != "checkpoint"}
    if os.path.exists(done_path):
      with open(done_path) as f:
        done = json.load(f)
      if {k: v for k, v in done["config"].items() if k != "checkpoint"} != cfg_dict:
        sys.exit(f"{workdir} holds a finished run with a different config; use another --out-dir "
                 "or delete it")
      print(f"[{i + 1}/{len(configs)}] {name}: finished earlier, skipped", flush=True)
      walls[name] = done["wall_sec"]
      continue
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
      # No checkpoint: the run starts over, and metrics.jsonl would otherwise keep the old lines.
      shutil.rmtree(workdir, ignore_errors=True)
    print(f"[{i + 1}/{len(configs)}] {name}: training in {workdir}", flush=True)
    start = time.time()
    jaxtrain.train(cfg, workdir, log=lambda msg, name=name: print(f"  {name}: {msg}", flush=True))
    wall = time.time() - start
    walls[name] = wall
    with open(done_path, "w") as f:
      json.dump({"config": cfg_dict, "wall_sec": wall}, f, indent=2)
    _, val = read_metrics(workdir)
    final = f"{val[-1][1]['eval_loss']:.4f}" if val else "?"
    print(f"  {name}: done in {wall:.0f} s, final val loss {final}", flush=True)
  return walls


def _done_wall(args, name):
  """Wall seconds recorded when the run finished (for --plot-only); None if unknown."""
  try:
    with open(os.path.join(args.out_dir, name, "done.json")) as f:
      return json.load(f)["wall_sec"]
  except (OSError, KeyError, ValueError):
    return None


def first_step_at_or_below(val, target):
  """The first evaluation step with validation loss <= target (a small tolerance absorbs the
  float noise of comparing a run with its own final value); None if it never gets there."""
  for step, r in val:
    if r["eval_loss"] <= target + 1e-9:
      return step
  return None


def summarize(args, runs, walls):
  """Per-run numbers, the best lr per optimizer and each run's steps to AdamW's final val loss."""
  rows = []
  for name, (opt, lr) in runs.items():
    train, val = read_metrics(os.path.join(args.out_dir, name))
    if not val or val[-1][0] != args.steps:
      print(f"warning: {name} has no final evaluation at step {args.steps}; left out",
            file=sys.stderr)
      continue
    step_secs = [args.batch_size * args.seq_len / r["tokens_per_sec"] for _, r in train
                 if r.get("tokens_per_sec") and math.isfinite(r["tokens_per_sec"])]
    rows.append(dict(name=name, optimizer=opt, lr=lr, train=train, val=val,
                     final_train=train[-1][1]["loss"] if train else float("nan"),
                     final_val=val[-1][1]["eval_loss"],
                     sec_per_step=statistics.median(step_secs) if step_secs else float("nan"),
                     wall_sec=walls.get(name) or _done_wall(args, name)))
  best = {}
  for opt in OPTIMIZERS:
    mine = [r for r in rows if r["optimizer"] == opt]
    if mine:
      best[opt] = min(mine, key=lambda r: r["final_val"])
  target = best["adamw"]["final_val"] if "adamw" in best else None
  for r in rows:
    r["best"] = best.get(r["optimizer"]) is r
    r["steps_to_target"] = (first_step_at_or_below(r["val"], target) if target is not None
                            else None)
  return rows, best, target


def markdown_table(rows):
  lines = ["| optimizer | lr | final train loss | final val loss | steps to AdamW's final val loss "
           "| s/step (median) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    mark = "**" if r["best"] else ""
    steps = "never" if r["steps_to_target"] is None else str(r["steps_to_target"])
    lines.append(f"| {mark}{r['optimizer']}{mark} | {mark}{r['lr']:g}{mark} "
                 f"| {r['final_train']:.4f} | {mark}{r['final_val']:.4f}{mark} "
                 f"| {mark}{steps}{mark} | {r['sec_per_step']:.2f} |")
  return "\n".join(lines)


def verdict(args, best, target):
  """One sentence on the best runs: the number issue 5 asks for."""
  if "adamw" not in best or "muon" not in best:
    return "(need finished AdamW and Muon runs for a comparison)"
  muon = best["muon"]
  a_lr, m_lr = best["adamw"]["lr"], muon["lr"]
  text = (f"Best AdamW (lr {a_lr:g}) ends at val loss {target:.4f} after {args.steps} steps; "
          f"best Muon (lr {m_lr:g}) ends at {muon['final_val']:.4f}")
  if muon["steps_to_target"] is None:
    return text + " and never reaches AdamW's final val loss."
  return (text + f" and first reaches AdamW's final val loss at step {muon['steps_to_target']} "
          f"({muon['steps_to_target'] / args.steps:.0%} of the steps; evaluations every "
          f"{args.eval_every or args.steps} steps).")


def moving_average(values, window):
  """Trailing mean over up to `window` values, one per value (the first ones average fewer), so
  the smoothed curve still starts at step 1 rather than `window` steps late."""
  out, total = [], 0.0
  for i, v in enumerate(values):
    total += v
    if i >= window:
      total -= values[i - window]
    out.append(total / min(i + 1, window))
  return out


def plot(args, rows, best, target, path):
  """Validation (left) and train (right) loss vs step, every run; the best of each optimizer
  drawn thick and solid, the others thin and dashed, so the lr sweep and the winner read at once."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  cmaps = {"adamw": plt.get_cmap("Blues"), "muon": plt.get_cmap("Reds")}
  fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.6))
  top = None
  # Every run sees the same batch at a step, so raw train losses swing together by whole nats
  # (files differ that much in predictability); a short moving average keeps the runs apart.
  window = max(1, max(len(r["train"]) for r in rows) // 24)
  for opt in OPTIMIZERS:
    mine = sorted((r for r in rows if r["optimizer"] == opt), key=lambda r: r["lr"])
    for k, r in enumerate(mine):
      color = cmaps[opt](0.45 + 0.5 * (k + 1) / len(mine))
      style = dict(lw=2.4, ls="-", alpha=1.0, zorder=3) if r["best"] else dict(
          lw=1.1, ls="--", alpha=0.75, zorder=2)
      label = f"{opt} lr {r['lr']:g}" + (" (best)" if r["best"] else "")
      vs, vl = zip(*[(s, x["eval_loss"]) for s, x in r["val"]])
      ax_val.plot(vs, vl, marker="o", ms=3.5 if r["best"] else 2.5, color=color, label=label,
                  **style)
      if r["train"]:
        ts, tl = zip(*[(s, x["loss"]) for s, x in r["train"]])
        ax_train.plot(ts, moving_average(tl, window), color=color, label=label, **style)
      top = max(top or 0.0, vl[0])
  if target is not None:
    for ax in (ax_val, ax_train):
      ax.axhline(target, color="gray", lw=0.8, ls=":", zorder=1)
    ax_val.text(0.01, target, "AdamW final val", color="gray", fontsize=8, ha="left",
                va="bottom", transform=ax_val.get_yaxis_transform())
    m = best.get("muon")
    if m is not None and m["steps_to_target"] is not None:
      ax_val.axvline(m["steps_to_target"], color=cmaps["muon"](0.9), lw=0.8, ls=":", zorder=1)
  val_bottom = min(min(x["eval_loss"] for _, x in r["val"]) for r in rows)
  smoothed = [moving_average([x["loss"] for _, x in r["train"]], window)
              for r in rows if r["train"]]
  train_bottom = min([val_bottom] + [min(t) for t in smoothed])
  train_title = "train loss" + (f" (moving average of {window} logged steps)" if window > 1 else "")
  for ax, title, bottom in ((ax_val, "validation loss", val_bottom),
                            (ax_train, train_title, train_bottom)):
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom - 0.1, top + 0.3)  # The first steps (~ln V) would flatten everything else.
    ax.set_xlim(0, args.steps)
  ax_val.legend(fontsize=8)
  tokens = args.batch_size * args.seq_len
  fig.suptitle(f"Muon vs AdamW, {args.size}: {args.steps} steps x {args.batch_size} x "
               f"{args.seq_len} tokens ({args.steps * tokens / 1e6:.2f}M tokens), cosine, "
               f"same data order", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def machine_line():
  import jax  # pylint: disable=import-outside-toplevel
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
  return (f"{datetime.date.today()} · {cpu}, {os.cpu_count()} cores · {jax.device_count()}x "
          f"{jax.devices()[0].platform} · jax {jax.__version__} · "
          f"load average {load} (1/5/15 min)")


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  runs = {run_name(opt, lr): (opt, lr) for opt in OPTIMIZERS for lr in args.lrs[opt]}
  command = "python " + " ".join([os.path.relpath(__file__, os.getcwd())] +
                                 (sys.argv[1:] if argv is None else list(argv)))
  start = time.time()
  walls = {} if args.plot_only else train_all(args, runs)
  rows, best, target = summarize(args, runs, walls)
  if not rows:
    sys.exit("no finished runs to report")
  table = markdown_table(rows)
  summary = verdict(args, best, target)
  png = os.path.join(args.out_dir, "curves.png")
  plot(args, rows, best, target, png)
  header = machine_line()
  total = time.time() - start
  report = (f"`{command}`\n\n{header}; {total / 60:.1f} min wall for this invocation\n\n"
            f"{table}\n\n{summary}\n\nCurves: {png}\n")
  print("\n" + report)
  with open(os.path.join(args.out_dir, "results.md"), "w") as f:
    f.write(report)
  with open(os.path.join(args.out_dir, "results.json"), "w") as f:
    json.dump({"command": command, "machine": header, "target_val_loss": target,
               "runs": [{k: r[k] for k in ("name", "optimizer", "lr", "final_train", "final_val",
                                           "steps_to_target", "sec_per_step", "wall_sec", "best")}
                        for r in rows]}, f, indent=2)


if __name__ == "__main__":
  try:
    main()
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ != "UserError":  # A bad flag or config value: one line, as on the CLI.
      raise
    sys.exit(f"error: {e}")
