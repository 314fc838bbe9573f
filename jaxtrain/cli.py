"""The `jaxtrain` command.

  jaxtrain train [--config=configs/default.py] [--config.KEY=VALUE ...] [--workdir=runs/default]
  jaxtrain eval --workdir=DIR [--split=validation] [--batches=N]
  jaxtrain generate --workdir=DIR --prompt="def " [--max-new-tokens=64] [--temperature=0]
  jaxtrain info --config=configs/llama.py:1.4b [--routing]
  jaxtrain data prepare [--config=...]
  jaxtrain convert SRC DST            # HF directory <-> jaxtrain workdir, direction detected
  jaxtrain compare RUN_DIR... [--out=compare.png]   # runs on different hardware, normalised

Exit codes: 0 success, 2 bad input (one line on stderr naming the culprit), 1 other failure.
"""

import os
import sys

from jaxtrain.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")
USAGE = __doc__


class Args:
  """`--config=SPEC`, `--config.a.b=v` overrides (in order), other `--name=value` flags, and
  positional words."""

  def __init__(self, argv, flags=()):
    self.config = None
    self.overrides = []
    self.flags = {}
    self.positional = []
    for arg in argv:
      if arg.startswith("--config."):
        key, sep, value = arg[len("--config."):].partition("=")
        if not sep:
          raise UserError(f"{arg}: overrides are written --config.KEY=VALUE")
        self.overrides.append((key, value))
      elif arg.startswith("--config="):
        self.config = arg[len("--config="):]
      elif arg.startswith("--"):
        name, sep, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in flags:
          raise UserError(f"unknown flag --{name} (this command takes: "
                          f"{', '.join('--' + f for f in ('config',) + tuple(flags))})")
        self.flags[name] = value if sep else "true"
      else:
        self.positional.append(arg)

  def load_config(self):
    from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
    spec = self.config or DEFAULT_CONFIG
    if not self.config and not os.path.exists(DEFAULT_CONFIG):
      raise UserError("no --config given and configs/default.py is not next to the package")
    return config_lib.load_config(spec, self.overrides)


def cmd_train(argv):
  import jaxtrain  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("workdir",))
  cfg = args.load_config()
  workdir = args.flags.get("workdir", os.path.join("runs", "default"))
  record = jaxtrain.train(cfg, workdir)
  keys = ("step", "loss", "eval_loss", "bits_per_byte", "tokens_per_sec", "mfu")
  print("done: " + ", ".join(f"{k}={record[k]:.4g}" if isinstance(record.get(k), float)
                             else f"{k}={record.get(k)}" for k in keys if k in record))
  print(f"workdir: {workdir} (metrics.jsonl, loss.png, checkpoints/)")


def cmd_eval(argv):
  from jaxtrain import evaluate  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("workdir", "split", "batches", "step"))
  workdir = args.flags.get("workdir") or (args.positional[0] if args.positional else None)
  if not workdir:
    raise UserError("jaxtrain eval needs --workdir=DIR (a training run's directory)")
  batches = int(args.flags["batches"]) if "batches" in args.flags else None
  step = int(args.flags["step"]) if "step" in args.flags else None
  result = evaluate.evaluate_workdir(workdir, split=args.flags.get("split", "validation"),
                                     max_batches=batches, step=step,
                                     overrides=args.overrides)
  print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()))


def cmd_info(argv):
  from jaxtrain import info  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("routing",))
  cfg = args.load_config()
  print(info.describe(cfg, routing=args.flags.get("routing", "false") != "false"))


def cmd_data(argv):
  args = Args(argv)
  if args.positional != ["prepare"]:
    raise UserError("usage: jaxtrain data prepare [--config=...] [--config.data.KEY=VALUE]")
  from jaxtrain import config as config_lib, data  # pylint: disable=import-outside-toplevel
  cfg = args.load_config()
  config_lib.validate(cfg)
  stats = data.prepare(cfg.data, cfg.model.vocab_size)
  print(f"{'split':<12}{'documents':>12}{'tokens':>14}{'bytes':>14}{'bytes/token':>13}")
  for split, s in stats.items():
    if not isinstance(s, dict):
      continue
    ratio = s["bytes"] / s["tokens"] if s.get("tokens") else float("nan")
    print(f"{split:<12}{s['documents']:>12,}{s['tokens']:>14,}{s['bytes']:>14,}{ratio:>13.2f}")


def cmd_convert(argv):
  from jaxtrain import convert  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("step",))
  if len(args.positional) != 2:
    raise UserError("usage: jaxtrain convert SRC DST (an HF LLaMA directory and a workdir, "
                    "either way round)")
  src, dst = args.positional
  step = int(args.flags["step"]) if "step" in args.flags else None
  print(convert.convert_command(src, dst, step=step))


def cmd_compare(argv):
  from jaxtrain import compare  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("out",))
  text, png = compare.compare(args.positional, args.flags.get("out", "compare.png"))
  print(text)
  print(f"plot: {png}")


def cmd_generate(argv):
  """Sample from a checkpoint.

  Flags: --workdir=DIR (a training workdir, latest checkpoint, or an HF LLaMA directory),
  --prompt=TEXT (repeat for several prompts, decoded together), --max-new-tokens=N (64),
  --temperature=T (0: greedy), --top-k=K (0: off), --top-p=P (1.0: off), --seed=S (0),
  --step=N (a checkpoint other than the latest).

  Example: jaxtrain generate --workdir=runs/default --prompt="def " --max-new-tokens=64
  """
  import jaxtrain  # pylint: disable=import-outside-toplevel
  flags = ("workdir", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "step")
  prompts = [a.partition("=")[2] for a in argv if a.startswith("--prompt=")]
  args = Args([a for a in argv if not a.startswith("--prompt=")], flags=flags)
  workdir = args.flags.get("workdir")
  if not workdir:
    raise UserError("jaxtrain generate needs --workdir=DIR (a workdir or an HF LLaMA directory)")
  if not prompts:
    raise UserError('jaxtrain generate needs --prompt="TEXT"')

  def number(name, kind, default):
    try:
      return kind(args.flags.get(name, default))
    except ValueError:
      raise UserError(f"--{name.replace('_', '-')}={args.flags[name]!r} is not a {kind.__name__}")

  step = number("step", int, -1)
  model, tokenizer = jaxtrain.load_model(workdir, step=None if step < 0 else step)
  if tokenizer is None:
    raise UserError(f"{workdir} has no tokenizer: text prompts need one")
  outs = jaxtrain.generate(model, prompts, max_new_tokens=number("max_new_tokens", int, 64),
                           temperature=number("temperature", float, 0.0),
                           top_k=number("top_k", int, 0), top_p=number("top_p", float, 1.0),
                           seed=number("seed", int, 0), tokenizer=tokenizer)
  for prompt, out in zip(prompts, outs):
    print(prompt + out.text)
    if len(prompts) > 1:
      print("-" * 40)


COMMANDS = {"train": cmd_train, "compare": cmd_compare, "eval": cmd_eval, "info": cmd_info, "data": cmd_data,
            "convert": cmd_convert, "generate": cmd_generate}


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    if not argv:
      argv = ["train"]
    else:
      print(USAGE)
      return 0
  verb, rest = argv[0], argv[1:]
  if verb.startswith("--"):
    verb, rest = "train", argv
  if verb not in COMMANDS:
    print(f"error: unknown command {verb!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  from jaxtrain.trainer import Preempted  # pylint: disable=import-outside-toplevel
  try:
    COMMANDS[verb](rest)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Preempted as e:
    print(f"{e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
