"""`jaxtrain compare RUN_DIR...`: runs made on different hardware, side by side and normalised.

Compute is normalised by each run's device peak: `seconds at peak` = tokens x FLOPs/token /
(devices x dense peak FLOP/s). Two runs of the same config whose loss curves coincide against
this axis used their hardware equally well; the MFU ratio to the first run says by how much they
differ. The numbers come from each workdir's `run.json` (device, peak, FLOPs/token, written at
the start of training) and `metrics.jsonl`.
"""

import os
import statistics

from jaxtrain import metrics as metrics_lib
from jaxtrain.errors import UserError


def summarize(workdir):
  """The comparison numbers of one run, from its files."""
  if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
    raise UserError(f"{workdir}/metrics.jsonl does not exist: not a training run")
  info = metrics_lib.read_run_info(workdir)
  if info is None:
    raise UserError(f"{workdir}/run.json does not exist (written when training starts)")
  # A resumed run logs the steps it redoes again: the last line of a step is the one that
  # stands. Per-source lines of a mixture are left out (the overall line is the run's loss).
  # A non-finite loss is logged as null: kept, as NaN, so a diverged run shows as one.
  latest = {}
  for r in metrics_lib.read_metrics(workdir):
    if "source" not in r and "step" in r:
      latest[(r.get("split"), r["step"])] = r
  nan = float("nan")
  train = [{**r, "loss": nan if r.get("loss") is None else r["loss"]}
           for (split, _), r in sorted(latest.items(), key=lambda kv: kv[0][1])
           if split is None and "loss" in r]
  evals = [{**r, "eval_loss": nan if r.get("eval_loss") is None else r["eval_loss"]}
           for (split, _), r in sorted(latest.items(), key=lambda kv: kv[0][1])
           if split == "validation"]
  if not train:
    raise UserError(f"{workdir}/metrics.jsonl has no training lines")
  peak = info.get("peak_tflops_per_device") or float("nan")
  flops_per_token = info["flops_per_token"]
  per_step = info["tokens_per_step"]
  devices = info["num_devices"]

  def seconds_at_peak(step):
    return step * per_step * flops_per_token / (devices * peak * 1e12)

  # The first logged interval can include warm-up; medians keep it from skewing the result.
  tps = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
  mfu = [r["mfu"] for r in train if r.get("mfu") is not None]
  return {
      "workdir": workdir, "device": f"{devices}x {info['device_kind']}", "peak": peak,
      "steps": train[-1]["step"], "tokens": train[-1]["step"] * per_step,
      "final_loss": train[-1]["loss"],
      "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
      "tokens_per_sec": statistics.median(tps) if tps else None,
      "mfu": statistics.median(mfu) if mfu else None,
      "curve_tokens": [(r["step"] * per_step, r["loss"]) for r in train],
      "curve_compute": [(seconds_at_peak(r["step"]), r["loss"]) for r in train],
      "eval_compute": [(seconds_at_peak(r["step"]), r["eval_loss"]) for r in evals],
  }


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def table(runs):
  base_mfu = runs[0]["mfu"]
  lines = ["| run | device | peak TFLOP/s | steps | tokens | loss | eval loss | tokens/s | MFU | "
           "MFU / first |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    ratio = r["mfu"] / base_mfu if r["mfu"] and base_mfu else None
    lines.append(f"| {r['workdir']} | {r['device']} | {_fmt(r['peak'], '.1f')} | {r['steps']} | "
                 f"{r['tokens']:,} | {_fmt(r['final_loss'], '.4f')} | "
                 f"{_fmt(r['final_eval_loss'], '.4f')} | {_fmt(r['tokens_per_sec'], ',.0f')} | "
                 f"{_fmt(r['mfu'], '.3f')} | {_fmt(ratio, '.2f')} |")
  return "\n".join(lines)


def plot(runs, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax_tok, ax_cmp) = plt.subplots(1, 2, figsize=(11, 4))
  for r in runs:
    label = f"{r['workdir']} ({r['device']})"
    ax_tok.plot(*zip(*r["curve_tokens"]), label=label)
    ax_cmp.plot(*zip(*r["curve_compute"]), label=label)
  ax_tok.set_xlabel("tokens")
  ax_cmp.set_xlabel("seconds at device peak (FLOPs / (devices x dense peak))")
  for ax in (ax_tok, ax_cmp):
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
  ax_tok.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def compare(workdirs, out_png="compare.png"):
  if not workdirs:
    raise UserError("usage: jaxtrain compare RUN_DIR [RUN_DIR ...] [--out=compare.png]")
  runs = [summarize(w) for w in workdirs]
  return table(runs), plot(runs, out_png)
