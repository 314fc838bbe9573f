"""Optimizer studies: per optimizer an lr grid bracketed on both sides, several seeds, a report.

`run_study(config, optimizers, seeds, workdir)` trains every (optimizer, lr, seed) as an ordinary
jaxtrain workdir, `WORKDIR/<optimizer>/lr<lr>/seed<seed>/`: a finished run (its final evaluation
is in metrics.jsonl) is skipped, an unfinished one resumes through `trainer.train`'s normal resume,
so re-running the same command after an interruption continues the study. Every run decays its lr
fully (the config's cosine or WSD schedule with `optimizer.min_lr_ratio=0`), because comparisons
stopped before the decay ends, or with one side's lr untuned, overstate speedups (Wen et al. 2025,
"Fantastic Pretraining Optimizers and Where to Find Them", arXiv:2509.02046).

The lr grid of each optimizer starts from `lrs` (default: the optimizer's reference lr times
1/2, 1, 2) and extends itself: while the best lr (lowest final validation loss averaged over the
seeds) is the smallest or largest tried, one more lr a grid step beyond it is run (at most
`max_extend` times per side), so the reported optimum is bracketed on both sides.

The report (study.json, study.md, study.png in WORKDIR), per optimizer at its best lr: final
validation loss (mean, std, min, max over seeds), steps, tokens and FLOPs of the run (model FLOPs
per DESIGN.md plus the optimizer's own Newton-Schulz matmul FLOPs from the parameter shapes), and
the steps, tokens, FLOPs and wall seconds at which its seed-mean validation curve first reaches
the tuned AdamW's final loss (linear interpolation between evaluations). Wall seconds are
training seconds: each log interval's steps at its measured tokens/s, without compilation,
evaluation and checkpoints; on a shared machine they are noisy, steps and FLOPs are not.
"""

import json
import math
import os
from typing import Callable

import ml_collections
import numpy as np

from jaxtrain import config as config_lib
from jaxtrain import metrics as metrics_lib
from jaxtrain.errors import UserError

# Named optimizer setups: config overrides on top of the study's config.
OPTIMIZERS = {
    "adamw": {"optimizer.name": "adamw"},
    "muon": {"optimizer.name": "muon"},
    "muon_gram": {"optimizer.name": "muon", "optimizer.muon.ns_method": "gram"},
    "normuon": {"optimizer.name": "muon", "optimizer.muon.variant": "normuon"},
    "muonh": {"optimizer.name": "muon", "optimizer.hyperball": True},
    "adamh": {"optimizer.name": "adamw", "optimizer.hyperball": True},
    "muonclip": {"optimizer.name": "muon", "optimizer.qk_clip_tau": 100.0},
}
# Hyperball's lr is an angle per step (radians, roughly), not a weight-decay-era lr: its grid
# starts here instead of at optimizer.lr.
HYPERBALL_LR = 0.02
GRID_FACTOR = 2.0
FAILED = "STUDY_FAILED"  # written into a run's workdir when training raised; the run is skipped


def reference_lr(cfg, name):
  return HYPERBALL_LR if OPTIMIZERS[name].get("optimizer.hyperball") else cfg.optimizer.lr


def parse_optimizers(text):
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise UserError("--optimizers needs at least one name, e.g. --optimizers=adamw,muon")
  for n in names:
    if n not in OPTIMIZERS:
      raise UserError(f"unknown optimizer {n!r} in --optimizers (known: {', '.join(OPTIMIZERS)})")
  if len(set(names)) != len(names):
    raise UserError(f"--optimizers={text!r} names an optimizer twice")
  return names


def parse_lrs(text, names):
  """'1e-3,2e-3' for every optimizer, or 'adamw:1e-3,2e-3/muon:0.01,0.02' per optimizer."""
  out = {}

  def numbers(part, what):
    try:
      lrs = sorted({float(x) for x in part.split(",") if x.strip()})
    except ValueError:
      raise UserError(f"--lrs: {part!r} ({what}) is not a comma-separated list of numbers") from None
    if not lrs or any(not math.isfinite(lr) or lr <= 0 for lr in lrs):
      raise UserError(f"--lrs: {part!r} ({what}) needs learning rates > 0")
    return lrs

  if ":" not in text:
    lrs = numbers(text, "every optimizer")
    return {n: lrs for n in names}
  for part in text.split("/"):
    name, sep, values = part.partition(":")
    if not sep or name.strip() not in names:
      raise UserError(f"--lrs: {part!r} must be NAME:LR,LR,... with NAME one of --optimizers "
                      f"({', '.join(names)})")
    out[name.strip()] = numbers(values, name.strip())
  return out


def lr_tag(lr):
  return f"lr{lr:.4g}"


def run_config(base, name, lr, seed, steps):
  """The config of one run of the study (a copy of `base`)."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  for key, value in OPTIMIZERS[name].items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  cfg.optimizer.lr = float(lr)
  cfg.optimizer.min_lr_ratio = 0.0  # decay fully: the comparison is at the end of the decay
  cfg.train.seed = int(seed)
  if steps is not None:
    cfg.train.steps = int(steps)
  if not cfg.train.eval_every or cfg.train.eval_every > cfg.train.steps // 4:
    cfg.train.eval_every = max(1, cfg.train.steps // 10)  # curves need several evaluations
  cfg.train.progress_bar = False
  return cfg


def check_study_config(cfg):
  if cfg.optimizer.schedule not in ("cosine", "wsd"):
    raise UserError(f"optimizer.schedule={cfg.optimizer.schedule!r}: a study needs a schedule "
                    "that decays to the end (cosine or wsd)")
  config_lib.validate(cfg)


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  return metrics_lib.read_metrics(path)  # A half line left by a kill is skipped.


def run_status(workdir, steps):
  """'done' (final evaluation written), 'failed', 'partial' (something to resume) or 'new'."""
  if os.path.isfile(os.path.join(workdir, FAILED)):
    return "failed"
  for r in _records(workdir):
    if r.get("split") == "validation" and "source" not in r and r.get("step") == steps:
      return "done"
  return "partial" if os.path.isdir(os.path.join(workdir, "checkpoints")) else "new"


_COMPARED = (("model",), ("optimizer",), ("train", "steps"), ("train", "seed"),
             ("train", "batch_size"), ("data", "seq_len"), ("data", "source"))


def _check_same_run(workdir, cfg):
  """An existing workdir must hold this very run; resuming another config would mix them."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    saved = json.load(f)
  import jax  # pylint: disable=import-outside-toplevel
  want = json.loads(config_lib.to_json(config_lib.resolve(cfg, jax.device_count())))
  for keys in _COMPARED:
    a, b = saved, want
    for k in keys:
      a, b = (a or {}).get(k), (b or {}).get(k)
    if a != b:
      raise UserError(f"{workdir} holds a run with a different {'.'.join(keys)}; use another "
                      "--workdir for a study with other settings")


def default_train(cfg, workdir, log=print):
  from jaxtrain import trainer  # pylint: disable=import-outside-toplevel
  return trainer.train(cfg, workdir, log=log)


def final_loss(workdir, steps):
  for r in reversed(_records(workdir)):
    if r.get("split") == "validation" and "source" not in r and r.get("step") == steps:
      loss = r.get("eval_loss")
      return loss if isinstance(loss, (int, float)) and math.isfinite(loss) else math.inf
  return math.inf


def run_study(cfg, optimizers, seeds, workdir, *, lrs=None, steps=None, max_extend=3,
              train_fn: Callable | None = None, log=print):
  """Run (or continue) the study and write its report; returns the report dict."""
  names = list(optimizers)
  seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
  if not seeds:
    raise UserError("--seeds must be >= 1")
  grids = {n: sorted(lrs[n]) if lrs and n in lrs else
           [reference_lr(cfg, n) * f for f in (1 / GRID_FACTOR, 1.0, GRID_FACTOR)] for n in names}
  for n in names:  # every config is checked before anything compiles
    check_study_config(run_config(cfg, n, grids[n][0], seeds[0], steps))
  train_fn = train_fn or default_train
  total_steps = run_config(cfg, names[0], 1.0, 0, steps).train.steps
  os.makedirs(workdir, exist_ok=True)
  counts = {"skipped": 0, "resumed": 0, "new": 0, "failed": 0}
  visited = set()

  def run_one(name, lr, seed):
    if (name, lr, seed) in visited:  # an extended grid revisits the lrs it already had
      return
    visited.add((name, lr, seed))
    rcfg = run_config(cfg, name, lr, seed, steps)
    wd = os.path.join(workdir, name, lr_tag(lr), f"seed{seed}")
    status = run_status(wd, rcfg.train.steps)
    if status in ("done", "failed"):
      counts["skipped" if status == "done" else "failed"] += 1
      return
    _check_same_run(wd, rcfg)
    counts["resumed" if status == "partial" else "new"] += 1
    log(f"study: {name} lr={lr:.4g} seed={seed} ({'resuming' if status == 'partial' else 'new'})"
        f" -> {wd}")
    try:
      train_fn(rcfg, wd)
    except (UserError, KeyboardInterrupt):
      raise
    except Exception as e:  # pylint: disable=broad-except
      if type(e).__name__ == "Preempted":
        raise
      # A diverged or crashed run is a result (loss inf), not the end of the study.
      with open(os.path.join(wd, FAILED), "w") as f:
        f.write(f"{type(e).__name__}: {e}\n")
      counts["failed"] += 1
      log(f"study: {name} lr={lr:.4g} seed={seed} failed: {type(e).__name__}: {e}")

  def mean_final(name, lr):
    losses = [final_loss(os.path.join(workdir, name, lr_tag(lr), f"seed{s}"), total_steps)
              for s in seeds]
    return float(np.mean(losses)) if all(map(math.isfinite, losses)) else math.inf

  for name in names:
    grid = grids[name]
    extended = {"low": 0, "high": 0}
    while True:
      for lr in grid:
        for seed in seeds:
          run_one(name, lr, seed)
      means = [mean_final(name, lr) for lr in grid]
      best = int(np.argmin(means))
      grow = []
      if best == 0 and extended["low"] < max_extend:
        step = grid[1] / grid[0] if len(grid) > 1 else GRID_FACTOR
        grow.append(("low", grid[0] / step))
      if best == len(grid) - 1 and extended["high"] < max_extend:
        step = grid[-1] / grid[-2] if len(grid) > 1 else GRID_FACTOR
        grow.append(("high", grid[-1] * step))
      if not grow or not math.isfinite(means[best]):
        break
      for side, lr in grow:
        extended[side] += 1
        log(f"study: {name}: best lr {grid[best]:.4g} is at the {side} edge of the grid; "
            f"adding {lr:.4g}")
        grid = sorted(grid + [lr])
    grids[name] = grid
    done = names[:names.index(name) + 1]
    if name != names[-1]:  # a report after every optimizer, so a stopped study still has one
      write_report(make_report(cfg, done, grids, seeds, workdir, steps), workdir)
  log(f"study: runs {counts['new']} new, {counts['resumed']} resumed, {counts['skipped']} "
      f"finished before, {counts['failed']} failed")
  report = make_report(cfg, names, grids, seeds, workdir, steps)
  report["runs"] = counts
  write_report(report, workdir)
  return report


# ---------------------------------------------------------------------------------------------
# The report.


def optimizer_flops_per_step(cfg):
  """Matmul FLOPs of one optimizer step: Newton-Schulz of every Muon matrix (from shapes).

  AdamW's and the other elementwise work (a few FLOPs per parameter) is not counted."""
  if cfg.optimizer.name != "muon":
    return 0
  from jaxtrain import model as model_lib, optim  # pylint: disable=import-outside-toplevel
  from jaxtrain.optim import routing  # pylint: disable=import-outside-toplevel
  _, abstract = model_lib.params_of(model_lib.abstract_model(
      model_lib.ModelConfig.from_config(cfg.model)))
  m = cfg.optimizer.muon
  total = 0
  for path, shape, group in routing.routing_table(abstract, cfg.optimizer):
    if group != routing.MUON:
      continue
    layout = routing.hidden_layout(path, tuple(tuple(r) for r in m.hidden))
    fan_in, fan_out = routing.fans(shape, layout)
    batch = int(np.prod([d for d, a in zip(shape, layout) if a == "b"]))
    total += batch * optim.ns_flops(fan_in, fan_out, m.ns_steps, m.ns_method, m.gram_restart)
  return total


def _curve(workdir, tokens_per_step):
  """(eval steps, eval losses, {step: training seconds}) of one run.

  Training seconds add up each log interval's steps at its measured tokens/s, so compilation,
  evaluation and checkpointing are left out, and a resumed run's intervals simply continue."""
  evals, train = {}, {}
  for r in _records(workdir):
    if r.get("split") == "validation" and "source" not in r:
      evals[r["step"]] = r["eval_loss"]
    elif "tokens_per_sec" in r and "split" not in r:
      train[r["step"]] = r["tokens_per_sec"]  # a resumed run's repeated steps: the last wins
  wall, total, prev = {}, 0.0, 0
  for step in sorted(train):
    rate = train[step]
    if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0:
      total += (step - prev) * tokens_per_step / rate
    prev = step
    wall[step] = total
  steps = sorted(evals)
  return steps, [evals[s] for s in steps], wall


def _first_reach(steps, losses, target):
  """The (interpolated) step at which a curve first gets to `target`, or None."""
  prev = None
  for s, loss in zip(steps, losses):
    if math.isfinite(loss) and loss <= target:
      if prev is None or not math.isfinite(prev[1]) or prev[1] == loss:
        return float(s)
      return prev[0] + (s - prev[0]) * (prev[1] - target) / (prev[1] - loss)
    prev = (s, loss)
  return None


def _interp_wall(wall, step):
  if not wall or step is None:
    return None
  xs = sorted(wall)
  return float(np.interp(step, [0] + xs, [0.0] + [wall[x] for x in xs]))


def make_report(cfg, names, grids, seeds, workdir, steps):
  import jax  # pylint: disable=import-outside-toplevel
  base = run_config(cfg, names[0], 1.0, seeds[0], steps)
  total_steps = base.train.steps
  # The global batch the runs used: train.batch_size_per_device x this job's data-parallel size.
  tokens_per_step = config_lib.resolve(base, jax.device_count()).train.batch_size * (
      base.data.seq_len)
  from jaxtrain import model as model_lib  # pylint: disable=import-outside-toplevel
  model_flops_per_token = model_lib.flops_per_token(
      model_lib.ModelConfig.from_config(base.model), base.data.seq_len)
  out = {"date": None, "steps": total_steps, "tokens_per_step": tokens_per_step,
         "seeds": seeds, "model_flops_per_token": model_flops_per_token, "optimizers": {}}
  for name in names:
    grid_rows = []
    for lr in grids[name]:
      losses = [final_loss(os.path.join(workdir, name, lr_tag(lr), f"seed{s}"), total_steps)
                for s in seeds]
      ok = all(map(math.isfinite, losses))
      grid_rows.append({"lr": lr, "losses": losses,
                        "mean": float(np.mean(losses)) if ok else math.inf,
                        "std": float(np.std(losses)) if ok else math.inf})
    best = min(grid_rows, key=lambda r: r["mean"])
    rcfg = run_config(cfg, name, best["lr"], seeds[0], steps)
    opt_flops = optimizer_flops_per_step(rcfg)
    curves = [_curve(os.path.join(workdir, name, lr_tag(best["lr"]), f"seed{s}"),
                     tokens_per_step) for s in seeds]
    common = sorted(set.intersection(*[set(c[0]) for c in curves])) if curves else []
    per_seed = np.array([[dict(zip(c[0], c[1]))[s] for s in common] for c in curves]) if common \
        else np.zeros((len(seeds), 0))
    out["optimizers"][name] = {
        "best_lr": best["lr"], "lr_grid": grid_rows,
        "bracketed": grid_rows[0]["mean"] > best["mean"] < grid_rows[-1]["mean"],
        "final_loss_mean": best["mean"], "final_loss_std": best["std"],
        "final_loss_min": float(min(best["losses"])), "final_loss_max": float(max(best["losses"])),
        "steps": total_steps, "tokens": total_steps * tokens_per_step,
        "optimizer_flops_per_step": opt_flops,
        "flops": total_steps * (tokens_per_step * model_flops_per_token + opt_flops),
        "curve_steps": common, "curve_mean": per_seed.mean(0).tolist() if common else [],
        "curve_min": per_seed.min(0).tolist() if common else [],
        "curve_max": per_seed.max(0).tolist() if common else [],
        "wall_sec": float(np.mean([max(c[2].values()) for c in curves if c[2]]))
                    if any(c[2] for c in curves) else None,
        "_walls": [c[2] for c in curves],
    }
  target_name = "adamw" if "adamw" in names else names[0]
  target = out["optimizers"][target_name]["final_loss_mean"]
  out["target"] = {"optimizer": target_name, "loss": target}
  for name, o in out["optimizers"].items():
    step = _first_reach(o["curve_steps"], o["curve_mean"], target) if math.isfinite(target) \
        else None
    walls = [w for w in (_interp_wall(w, step) for w in o.pop("_walls")) if w is not None]
    o["to_target"] = None if step is None else {
        "steps": step, "tokens": step * tokens_per_step,
        "flops": step * (tokens_per_step * model_flops_per_token + o["optimizer_flops_per_step"]),
        "wall_sec": float(np.mean(walls)) if walls else None}
  ref = out["optimizers"][target_name]["to_target"]
  for o in out["optimizers"].values():
    t = o["to_target"]
    o["speedup_steps"] = (ref["steps"] / t["steps"]) if t and ref and t["steps"] else None
    o["speedup_flops"] = (ref["flops"] / t["flops"]) if t and ref and t["flops"] else None
  return out


def _fmt(x, spec=".4g"):
  return "-" if x is None else format(x, spec)


def format_markdown(report):
  t = report["target"]
  lines = [
      f"Target: the tuned {t['optimizer']}'s final validation loss, {t['loss']:.4f} "
      f"(mean of {len(report['seeds'])} seeds). {report['steps']} steps of "
      f"{report['tokens_per_step']:,} tokens; lr decayed to 0.",
      "",
      "| optimizer | best lr | final val loss (mean ± std, min-max) | bracketed | "
      f"steps to {t['loss']:.3f} | tokens | FLOPs | train s | speedup (steps / FLOPs) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, o in report["optimizers"].items():
    tt = o["to_target"] or {}
    lines.append(
        f"| {name} | {o['best_lr']:.4g} | {o['final_loss_mean']:.4f} ± {o['final_loss_std']:.4f} "
        f"({o['final_loss_min']:.4f}-{o['final_loss_max']:.4f}) | "
        f"{'yes' if o['bracketed'] else 'NO'} | {_fmt(tt.get('steps'), '.0f')} | "
        f"{_fmt(tt.get('tokens'), '.3g')} | {_fmt(tt.get('flops'), '.3g')} | "
        f"{_fmt(tt.get('wall_sec'), '.0f')} | {_fmt(o['speedup_steps'], '.2f')}x / "
        f"{_fmt(o['speedup_flops'], '.2f')}x |")
  lines += ["", "lr grids (final validation loss, mean over seeds; * best):", ""]
  for name, o in report["optimizers"].items():
    cells = ", ".join(f"{r['lr']:.4g}: {r['mean']:.4f}{'*' if r['lr'] == o['best_lr'] else ''}"
                      for r in o["lr_grid"])
    lines.append(f"- {name}: {cells}")
  lines += ["", "FLOPs: model (DESIGN.md convention) plus the optimizer's Newton-Schulz matmuls "
            "(per step: " + ", ".join(f"{n} {o['optimizer_flops_per_step']:.3g}"
                                      for n, o in report["optimizers"].items()) + ")."]
  return "\n".join(lines) + "\n"


def plot(report, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
  for name, o in report["optimizers"].items():
    if not o["curve_steps"]:
      continue
    line, = ax.plot(o["curve_steps"], o["curve_mean"], "o-", ms=3,
                    label=f"{name} (lr {o['best_lr']:.3g})")
    ax.fill_between(o["curve_steps"], o["curve_min"], o["curve_max"], alpha=0.25,
                    color=line.get_color())
    grid = [(r["lr"], r["mean"]) for r in o["lr_grid"] if math.isfinite(r["mean"])]
    if grid:
      ax_lr.plot(*zip(*grid), "o-", color=line.get_color(), label=name)
  ax.axhline(report["target"]["loss"], color="gray", ls="--", lw=1,
             label=f"tuned {report['target']['optimizer']} final")
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(f"best lr per optimizer; band: min-max over {len(report['seeds'])} seeds")
  finals = [o["final_loss_mean"] for o in report["optimizers"].values()
            if math.isfinite(o["final_loss_mean"])]
  if finals:
    starts = [o["curve_mean"][0] for o in report["optimizers"].values() if o["curve_mean"]]
    top = min(max(starts), min(finals) + 3 * (max(finals) - min(finals) + 0.05)) if starts else None
    ax.set_ylim(min(finals) - 0.05, top)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax_lr.set_xscale("log")
  ax_lr.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping labels
  ax_lr.set_xlabel("peak lr")
  ax_lr.set_ylabel("final validation loss (mean over seeds)")
  ax_lr.set_title("lr grids")
  ax_lr.grid(alpha=0.3)
  ax_lr.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(report, workdir):
  import datetime  # pylint: disable=import-outside-toplevel
  report["date"] = datetime.date.today().isoformat()
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(report, f, indent=2)  # a diverged run's loss is written as Infinity
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(format_markdown(report))
  plot(report, os.path.join(workdir, "study.png"))
