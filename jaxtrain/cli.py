"""The `jaxtrain` command.

Each verb is one `cmd_VERB(argv)` function listed in COMMANDS; its docstring *is* its help
(`jaxtrain VERB --help`): first line a summary (shown by `jaxtrain --help`), then usage, flags,
examples and exit codes. Keeping the help next to the code that parses the flags is what keeps it
true, and lets a new verb arrive without touching a central table beyond COMMANDS.
"""

import difflib
import json
import inspect
import os
import sys

from jaxtrain.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")
HELP_FLAGS = ("-h", "--help")
EXIT_CODES = ("exit codes: 0 success, 2 bad input (one line on stderr naming the culprit), "
              "1 other failure")


def suggest(word, choices, prefix=""):
  """"; did you mean X?" for the closest of `choices` to a mistyped `word`, or ""."""
  match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
  return f"; did you mean {prefix}{match[0]}?" if match else ""


def _config_keys():
  from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"
  return list(walk(config_lib.base_config(), ""))


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
          known = ("config",) + tuple(flags)
          raise UserError(f"unknown flag --{name}{suggest(name, known + ('help',), '--')} "
                          f"(this command takes: {', '.join('--' + f for f in known)})")
        self.flags[name] = value if sep else "true"
      else:
        self.positional.append(arg)

  def load_config(self):
    from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
    spec = self.config or DEFAULT_CONFIG
    if not self.config and not os.path.exists(DEFAULT_CONFIG):
      raise UserError("no --config given and configs/default.py is not next to the package")
    try:
      return config_lib.load_config(spec, self.overrides)
    except UserError as e:
      # A mistyped override names a key that does not exist: point at the one that was meant.
      for key, _ in self.overrides:
        if str(e) == f"config key {key} does not exist":
          raise UserError(f"{e}{suggest(key, _config_keys(), '--config.')}") from None
      raise


def cmd_train(argv):
  """Train a model, or resume it: the same command on the same workdir continues.

  usage: jaxtrain train [--config=FILE[:ARG]] [--config.KEY=VALUE ...] [--workdir=DIR]
         jaxtrain [--config=...] ...          (train is the verb when none is given)

  flags:
    --config=FILE[:ARG]  config file and the argument of its get_config (default
                         configs/default.py: a small fp32 LLaMA on the embedded corpus)
    --config.KEY=VALUE   set any config key, e.g. --config.optimizer.name=muon
                         (every key: docs/configuration.md)
    --workdir=DIR        run directory: config.json, metrics.jsonl, loss.png, checkpoints/
                         (default runs/default)

  examples:
    jaxtrain train
    jaxtrain train --config=configs/llama.py:35m --config.optimizer.name=muon --workdir=runs/35m
    jaxtrain train --config=configs/llama.py:125m,h100 --workdir=runs/125m

  exit codes: 0 trained to train.steps; 1 preempted (SIGTERM: a checkpoint was saved, re-run the
  same command to resume) or another failure; 2 bad config, data or arguments (one line on stderr)
  """
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
  """Loss, perplexity and bits per byte of a run's checkpoints on a split of its data.

  usage: jaxtrain eval --workdir=DIR [--split=validation] [--batches=N] [--step=S | --steps=LIST]
                       [--config.data.KEY=VALUE ...]

  Prints one line per checkpoint and merges the numbers into DIR/eval.json (step, split, loss,
  perplexity, bits_per_byte, tokens evaluated, train_tokens seen by that checkpoint).

  flags:
    --workdir=DIR        a training run's directory (or give DIR as the first word)
    --split=NAME         train or validation (default validation)
    --batches=N          evaluate N batches (default the run's train.eval_batches)
    --step=S             checkpoint step (default the latest)
    --steps=LIST         several checkpoints, one compile: 100,200,300 or all
    --config.KEY=VALUE   e.g. --config.data.source=other.jsonl to evaluate on other data

  examples:
    jaxtrain eval --workdir=runs/default
    jaxtrain eval runs/35m --split=train --batches=4
    jaxtrain eval runs/35m --steps=all    # validation loss against training tokens

  exit codes: 0 printed the numbers; 2 no such run, step or split (one line on stderr); 1 other
  failure
  """
  from jaxtrain import evaluate  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("workdir", "split", "batches", "step", "steps"))
  workdir = args.flags.get("workdir") or (args.positional[0] if args.positional else None)
  if not workdir:
    raise UserError("jaxtrain eval needs --workdir=DIR (a training run's directory)")

  def integer(name, value):
    try:
      return int(value)
    except ValueError:
      raise UserError(f"--{name}={value!r} is not an integer") from None

  batches = integer("batches", args.flags["batches"]) if "batches" in args.flags else None
  if "step" in args.flags and "steps" in args.flags:
    raise UserError("jaxtrain eval takes --step or --steps, not both")
  if "steps" in args.flags:
    spec = args.flags["steps"]
    if spec == "all":
      steps = evaluate.checkpoint_steps(workdir)
      if not steps:
        raise UserError(f"{workdir}/checkpoints holds no checkpoint")
    else:
      steps = [integer("steps", t) for t in spec.split(",") if t.strip()]
      if not steps:
        raise UserError("--steps= is empty (give 100,200,300 or all)")
  else:
    steps = [integer("step", args.flags["step"]) if "step" in args.flags else None]
  results = evaluate.evaluate_steps(workdir, steps, split=args.flags.get("split", "validation"),
                                    max_batches=batches, overrides=args.overrides)
  for result in results:
    print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in result.items()))
  print(f"wrote {evaluate.write_eval_json(workdir, results)}")


def cmd_info(argv):
  """Parameters, FLOPs per token and memory of a config, computed abstractly (instant).

  usage: jaxtrain info [--config=FILE[:ARG]] [--config.KEY=VALUE ...] [--routing]
         jaxtrain info [--config=...] --plan [--devices=N] [--json] [--mfu=0.4]

  flags:
    --config=FILE[:ARG]  config file (default configs/default.py)
    --config.KEY=VALUE   override any config key
    --routing            also print which parameters go to Muon and which to AdamW
    --plan               compile the real training step ahead of time (nothing allocated) and
                         print XLA's per-device memory and FLOPs against the target's memory
                         (train.hardware, else this machine's GPU)
    --devices=N          plan for N devices (fake CPU devices in a subprocess if fewer are here)
    --json               the plan as JSON (the dict jaxtrain.plan returns)
    --mfu=F              the MFU the plan's step time assumes (default 0.4)

  examples:
    jaxtrain info --config=configs/llama.py:1.4b
    jaxtrain info --config=configs/llama.py:125m --config.optimizer.name=muon --routing
    jaxtrain info --config=configs/llama.py:1.4b,a40 --plan --devices=8

  exit codes: 0 printed; 2 bad config (one line on stderr); 1 other failure
  """
  from jaxtrain import info  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("routing", "plan", "devices", "json", "mfu"))
  cfg = args.load_config()
  if args.flags.get("plan", "false") == "false":
    print(info.describe(cfg, routing=args.flags.get("routing", "false") != "false"))
    return
  from jaxtrain import planner as plan_lib  # pylint: disable=import-outside-toplevel
  devices = _int_flag(args, "devices") if "devices" in args.flags else None
  mfu = _float_flag(args, "mfu") if "mfu" in args.flags else 0.4
  result = plan_lib.plan(cfg, devices=devices, mfu=mfu)
  if args.flags.get("json", "false") != "false":
    print(json.dumps(result, indent=2))
  else:
    print(plan_lib.format_plan(result))


def _int_flag(args, name):
  try:
    return int(args.flags[name])
  except ValueError:
    raise UserError(f"--{name}={args.flags[name]!r} is not an integer") from None


def _float_flag(args, name):
  try:
    return float(args.flags[name])
  except ValueError:
    raise UserError(f"--{name}={args.flags[name]!r} is not a number") from None


def cmd_data(argv):
  """Prepare a config's data ahead of training: split, train the tokenizer, tokenize.

  usage: jaxtrain data prepare [--config=FILE[:ARG]] [--config.data.KEY=VALUE ...]

  Training prepares its data itself when it is missing; this verb does it explicitly (once per
  machine: data.data_dir is shared by every run) and prints documents, tokens and bytes per split.

  flags:
    --config=FILE[:ARG]  config file (default configs/default.py)
    --config.KEY=VALUE   e.g. --config.data.source=corpus/*.txt --config.data.tokenizer=bpe

  examples:
    jaxtrain data prepare
    jaxtrain data prepare --config.data.source=tfds:tiny_shakespeare

  exit codes: 0 prepared; 2 bad data config or missing files (one line on stderr); 1 other
  failure
  """
  args = Args(argv)
  if args.positional != ["prepare"]:
    usage = "usage: jaxtrain data prepare [--config=...] [--config.data.KEY=VALUE]"
    if not args.positional:
      raise UserError(f"jaxtrain data needs a command ({usage})")
    word = " ".join(args.positional)
    raise UserError(f"unknown data command {word!r}{suggest(word, ['prepare'])} ({usage})")
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
  """Convert an HF LLaMA directory to a jaxtrain workdir or back (direction detected).

  usage: jaxtrain convert SRC DST [--step=S]

  SRC is an HF directory (config.json + safetensors + tokenizer) and DST a new workdir, or SRC a
  workdir and DST a new HF directory. Details: docs/convert.md.

  flags:
    --step=S   checkpoint step to export from a workdir (default the latest)

  examples:
    jaxtrain convert path/to/hf-llama runs/imported
    jaxtrain convert runs/35m exported/35m-hf

  exit codes: 0 converted; 2 not an HF directory or workdir, or unsupported config (one line on
  stderr); 1 other failure
  """
  from jaxtrain import convert  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("step",))
  if len(args.positional) != 2:
    raise UserError("usage: jaxtrain convert SRC DST (an HF LLaMA directory and a workdir, "
                    "either way round)")
  src, dst = args.positional
  step = int(args.flags["step"]) if "step" in args.flags else None
  print(convert.convert_command(src, dst, step=step))


def cmd_compare(argv):
  """Runs on different hardware side by side: loss against tokens and seconds at peak.

  usage: jaxtrain compare RUN_DIR [RUN_DIR ...] [--out=compare.png]

  Prints a table (device, peak, steps, tokens, loss, tokens/s, MFU and MFU relative to the first
  run) and plots loss against tokens and against seconds at the device's dense peak, the axis on
  which runs of one config coincide when they used their hardware equally well.

  flags:
    --out=FILE   where the plot goes (default compare.png)

  examples:
    jaxtrain compare runs/a40 runs/h100 --out=a40_vs_h100.png

  exit codes: 0 printed and plotted; 2 a directory is not a training run (one line on stderr);
  1 other failure
  """
  from jaxtrain import compare  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("out",))
  text, png = compare.compare(args.positional, args.flags.get("out", "compare.png"))
  print(text)
  print(f"plot: {png}")


def cmd_generate(argv):
  """Sample from a checkpoint (KV-cache decoding, greedy or sampled).

  usage: jaxtrain generate --workdir=DIR (--prompt=TEXT | --prompt-ids=IDS) [...] [flags]

  flags:
    --workdir=DIR         a training workdir (latest checkpoint) or an HF LLaMA directory
    --prompt=TEXT         a prompt; repeat for several, decoded together
    --prompt-ids=IDS      a prompt as token ids (1,2,3), e.g. for a directory without a
                          tokenizer; repeatable; the new ids are printed
    --max-new-tokens=N    tokens to generate per prompt (default 64)
    --temperature=T       0 (default): greedy
    --top-k=K             keep the K most likely tokens (0: off)
    --top-p=P             nucleus sampling (1.0: off)
    --seed=S              sampling seed (default 0)
    --step=N              a checkpoint other than the latest

  examples:
    jaxtrain generate --workdir=runs/default --prompt="def " --max-new-tokens=64
    jaxtrain generate --workdir=runs/default --prompt="import " --temperature=0.8 --top-p=0.95
    jaxtrain generate --workdir=hf/llama --prompt-ids=1,450,4996 --max-new-tokens=8

  exit codes: 0 printed; 2 bad input (one line on stderr); 1 other failure
  """
  import jaxtrain  # pylint: disable=import-outside-toplevel
  flags = ("workdir", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "step")
  repeated = ("--prompt=", "--prompt-ids=")
  prompts = [a.partition("=")[2] for a in argv if a.startswith("--prompt=")]
  id_prompts = []
  for a in argv:
    if a.startswith("--prompt-ids="):
      value = a.partition("=")[2]
      try:
        ids = [int(t) for t in value.replace(",", " ").split()]
      except ValueError:
        raise UserError(f"--prompt-ids={value!r} is not a list of token ids like 1,2,3") from None
      if not ids:
        raise UserError("--prompt-ids= is empty (give token ids like 1,2,3)")
      id_prompts.append(ids)
  args = Args([a for a in argv if not a.startswith(repeated)], flags=flags)
  workdir = args.flags.get("workdir")
  if not workdir:
    raise UserError("jaxtrain generate needs --workdir=DIR (a workdir or an HF LLaMA directory)")
  if not prompts and not id_prompts:
    raise UserError('jaxtrain generate needs --prompt="TEXT" or --prompt-ids=1,2,3')
  if prompts and id_prompts:
    raise UserError("jaxtrain generate takes --prompt or --prompt-ids, not both")

  def number(name, kind, default):
    try:
      return kind(args.flags.get(name, default))
    except ValueError:
      raise UserError(f"--{name.replace('_', '-')}={args.flags[name]!r} is not a {kind.__name__}")

  step = number("step", int, -1)
  kwargs = dict(max_new_tokens=number("max_new_tokens", int, 64),
                temperature=number("temperature", float, 0.0), top_k=number("top_k", int, 0),
                top_p=number("top_p", float, 1.0), seed=number("seed", int, 0))
  model, tokenizer = jaxtrain.load_model(workdir, step=None if step < 0 else step)
  if id_prompts:
    V = model.config.vocab_size
    bad = [t for ids in id_prompts for t in ids if not 0 <= t < V]
    if bad:
      raise UserError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary [0, {V})")
    outs = jaxtrain.generate(model, id_prompts, **kwargs)
    for out in outs:
      print(",".join(str(t) for t in out.tokens))
    return
  if tokenizer is None:
    raise UserError(f"{workdir} has no tokenizer: text prompts need one (or use --prompt-ids=1,2,3)")
  outs = jaxtrain.generate(model, prompts, tokenizer=tokenizer, **kwargs)
  for prompt, out in zip(prompts, outs):
    print(prompt + out.text)
    if len(prompts) > 1:
      print("-" * 40)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "info": cmd_info, "data": cmd_data,
            "convert": cmd_convert, "compare": cmd_compare, "generate": cmd_generate}


def verb_help(verb):
  """A verb's help: its function's docstring, with the common exit codes if it names none."""
  doc = inspect.getdoc(COMMANDS[verb]) or f"jaxtrain {verb}"
  if "exit codes" not in doc.lower():
    doc += "\n\n" + EXIT_CODES
  return doc


def main_help():
  """`jaxtrain --help`: every verb with the first line of its help."""
  width = max(len(v) for v in COMMANDS) + 2
  verbs = "\n".join(f"  {v:<{width}}{verb_help(v).splitlines()[0]}" for v in COMMANDS)
  return f"""jaxtrain: pretrain LLaMA models with Muon in JAX.

usage: jaxtrain VERB [--config=FILE[:ARG]] [--config.KEY=VALUE ...] [flags]
       jaxtrain                 (no verb: train the default CPU config into runs/default)

verbs:
{verbs}

`jaxtrain VERB --help` (or `jaxtrain help VERB`): the verb's flags, examples and exit codes.
Every config key, its default and meaning: docs/configuration.md.
{EXIT_CODES}"""



def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in HELP_FLAGS + ("help",):
    topic = argv[1] if argv[0] == "help" and len(argv) > 1 else None
    if topic is None:
      print(main_help())
      return 0
    argv = [topic, "--help"]
  if not argv:
    argv = ["train"]
  verb, rest = argv[0], argv[1:]
  if verb.startswith("--"):
    verb, rest = "train", argv
  if verb not in COMMANDS:
    print(f"error: unknown command {verb!r}{suggest(verb, COMMANDS)} "
          f"(commands: {', '.join(COMMANDS)}; jaxtrain --help lists them)", file=sys.stderr)
    return 2
  if any(a in HELP_FLAGS for a in rest):
    print(verb_help(verb))
    return 0
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
