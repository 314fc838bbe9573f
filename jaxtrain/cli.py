"""The `jaxtrain` command.

Each verb is one `cmd_VERB(argv)` function listed in COMMANDS; its docstring *is* its help
(`jaxtrain VERB --help`): first line a summary (shown by `jaxtrain --help`), then usage, flags,
examples and exit codes. Keeping the help next to the code that parses the flags is what keeps it
true, and lets a new verb arrive without touching a central table beyond COMMANDS.
"""

import difflib
import errno
import json
import inspect
import os
import sys

from jaxtrain.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")
HELP_FLAGS = ("-h", "--help")
# Write errors a full or read-only disk gives: one line and exit code 1, never a traceback.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
EXIT_CODES = ("exit codes: 0 success, 2 bad input (one line on stderr naming the culprit), "
              "1 other failure")


def suggest(word, choices, prefix=""):
  """"; did you mean X?" for the closest of `choices` to a mistyped `word`, or ""."""
  match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
  return f"; did you mean {prefix}{match[0]}?" if match else ""


def _config_keys():
  from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
  return [key for key, _ in config_lib.flat_items(config_lib.base_config())]


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
                        [--coordinator=HOST:PORT --num-processes=N --process-id=I]
                        [--local-device-ids=0,1,...]
         jaxtrain [--config=...] ...          (train is the verb when none is given)

  flags:
    --config=FILE[:ARG]  config file and the argument of its get_config (default
                         configs/default.py: a small fp32 LLaMA on the embedded corpus)
    --config.KEY=VALUE   set any config key, e.g. --config.optimizer.name=muon
                         (every key: docs/configuration.md)
    --workdir=DIR        run directory: config.json, metrics.jsonl, loss.png, checkpoints/
                         (default runs/default)
    --coordinator=HOST:PORT  several processes: process 0's address, the same for all
                         (= --config.distributed.coordinator; under SLURM or Open MPI JAX reads
                         the cluster's variables instead: docs/scaling.md)
    --num-processes=N    processes in the job (= distributed.num_processes)
    --process-id=I       this process's index, 0 .. N-1 (= distributed.process_id)
    --local-device-ids=L devices this process drives, e.g. 0,1,2,3 for one process per node
                         (= distributed.local_device_ids; default all it sees)

  examples:
    jaxtrain train
    jaxtrain train --config=configs/llama.py:35m --config.optimizer.name=muon --workdir=runs/35m
    jaxtrain train --config=configs/llama.py:125m,h100 --workdir=runs/125m
    jaxtrain train --coordinator=10.0.0.1:1234 --num-processes=2 --process-id=0 --workdir=runs/x

  exit codes: 0 trained to train.steps; 1 preempted (SIGTERM to any process: every process saved
  the same step, re-run the same command to resume), a process died (the others exit within
  distributed.peer_timeout), a non-finite loss (train.on_nonfinite), a checkpoint that could not
  be written (disk full) or another failure; 2 bad config, data or arguments, or a workdir that is
  not writable (one line on stderr)
  """
  import jaxtrain  # pylint: disable=import-outside-toplevel
  dist_flags = ("coordinator", "num_processes", "process_id", "local_device_ids")
  args = Args(argv, flags=("workdir",) + dist_flags)
  cfg = args.load_config()
  for name in dist_flags:  # The flags are shorthands for distributed.* keys.
    if name in args.flags:
      from jaxtrain import config as config_lib  # pylint: disable=import-outside-toplevel
      config_lib.apply_override(cfg, f"distributed.{name}", args.flags[name])
  workdir = args.flags.get("workdir", os.path.join("runs", "default"))
  record = jaxtrain.train(cfg, workdir)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index():  # Several processes: process 0 reports for the job.
    return
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

  exit codes: 0 printed the numbers; 2 no such run, step or split, or a checkpoint that does not
  restore (one line on stderr; with --steps the others are still evaluated); 1 other failure
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
  if batches is not None and batches < 1:
    raise UserError(f"--batches={batches} must be at least 1")
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
  if results:
    print(f"wrote {evaluate.write_eval_json(workdir, results)}")
  if len(results) < len(steps):
    others = "; the others are in eval.json" if results else ""
    raise UserError(f"{len(steps) - len(results)} of {len(steps)} checkpoints could not be "
                    f"evaluated (named above){others}")


def cmd_info(argv):
  """Parameters, FLOPs per token and memory of a config, computed abstractly (instant).

  usage: jaxtrain info [--config=FILE[:ARG]] [--config.KEY=VALUE ...] [--routing]
         jaxtrain info [--config=...] --plan [--devices=N] [--nodes=K] [--json] [--mfu=0.4]

  flags:
    --config=FILE[:ARG]  config file (default configs/default.py)
    --config.KEY=VALUE   override any config key
    --routing            also print which parameters go to Muon and which to AdamW
    --plan               compile the real training step ahead of time (nothing allocated) and
                         print XLA's per-device memory and FLOPs against the target's memory
                         (train.hardware, else this machine's GPU)
    --devices=N          plan for N devices (fake CPU devices in a subprocess if fewer are here)
    --nodes=K            the N devices are on K nodes: also print which part of each mesh axis
                         crosses nodes (mesh.dcn_*; docs/scaling.md)
    --json               the plan as JSON (the dict jaxtrain.plan returns)
    --mfu=F              the MFU the plan's step time assumes (default 0.4)

  examples:
    jaxtrain info --config=configs/llama.py:1.4b
    jaxtrain info --config=configs/llama.py:125m --config.optimizer.name=muon --routing
    jaxtrain info --config=configs/llama.py:1.4b,a40 --plan --devices=8

  exit codes: 0 printed; 2 bad config (one line on stderr); 1 other failure
  """
  from jaxtrain import info  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("routing", "plan", "devices", "nodes", "json", "mfu"))
  cfg = args.load_config()
  if args.flags.get("plan", "false") == "false":
    print(info.describe(cfg, routing=args.flags.get("routing", "false") != "false"))
    return
  from jaxtrain import planner as plan_lib  # pylint: disable=import-outside-toplevel
  devices = _number(args, "devices", int, None)
  mfu = _number(args, "mfu", float, 0.4)
  nodes = _number(args, "nodes", int, 1)
  result = plan_lib.plan(cfg, devices=devices, mfu=mfu, nodes=nodes)
  if args.flags.get("json", "false") != "false":
    print(json.dumps(result, indent=2))
  else:
    print(plan_lib.format_plan(result))


def _number(args, name, kind, default):
  """A numeric flag (its default when absent), or a one-line UserError naming it."""
  if name not in args.flags:
    return default
  try:
    return kind(args.flags[name])
  except ValueError:
    raise UserError(f"--{name.replace('_', '-')}={args.flags[name]!r} is not "
                    f"{'an integer' if kind is int else 'a number'}") from None


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

  usage: jaxtrain convert SRC DST [--step=S] [--dtype=bfloat16]

  SRC is an HF directory (config.json + safetensors + tokenizer) and DST a new workdir, or SRC a
  workdir and DST a new HF directory. Details: docs/convert.md.

  flags:
    --step=S       checkpoint step to export from a workdir (default the latest)
    --dtype=NAME   weights of an export: float32 (default), bfloat16 or float16

  examples:
    jaxtrain convert path/to/hf-llama runs/imported
    jaxtrain convert runs/35m exported/35m-hf --dtype=bfloat16

  exit codes: 0 converted; 2 not an HF directory or workdir, or unsupported config (one line on
  stderr); 1 other failure
  """
  from jaxtrain import convert  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("step", "dtype"))
  if len(args.positional) != 2:
    raise UserError("usage: jaxtrain convert SRC DST (an HF LLaMA directory and a workdir, "
                    "either way round)")
  src, dst = args.positional
  step = args.flags.get("step")
  if step is not None and not step.strip().isdigit():
    raise UserError(f"--step={step!r} is not a checkpoint step (an integer)")
  dtype = args.flags.get("dtype")
  if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"--dtype={dtype!r} is not one of float32, bfloat16, float16")
  print(convert.convert_command(src, dst, step=None if step is None else int(step), dtype=dtype))


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


def cmd_serve(argv):
  """Serve a checkpoint over HTTP with OpenAI's completions API (continuous batching).

  usage: jaxtrain serve --workdir=DIR [--host=127.0.0.1] [--port=8000] [--slots=8] [flags]

  Compiles prefill and decode for every prompt bucket first, then prints "ready" and serves
  POST /v1/completions (streaming or not), GET /v1/models and GET /health until Ctrl-C.
  Details and curl examples: docs/serving.md.

  flags:
    --workdir=DIR            a training workdir (latest checkpoint) or an HF LLaMA directory
    --host=HOST              address to bind (default 127.0.0.1: this machine only)
    --port=N                 port (default 8000)
    --slots=N                requests decoded together (default 8)
    --max-len=N              KV-cache length per slot, prompt + output (default the model's
                             max_seq_len)
    --chunk=N                decode steps per dispatch, tokens per stream chunk (default 8)
    --step=N                 a checkpoint other than the latest
    --model-name=NAME        the model's name in the API (default the directory's name)
    --max-prompt-tokens=N    longest prompt accepted (default max-len / 2)
    --max-tokens=N           largest max_tokens accepted (default: what fits after the prompt)
    --max-body-bytes=N       largest request body accepted (default 1048576)
    --max-waiting=N          queued requests beyond the slots before a 429 (default 1024)

  examples:
    jaxtrain serve --workdir=runs/default
    jaxtrain serve --workdir=runs/35m --port=8001 --slots=16 --max-len=512
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
      -d '{"prompt": "def ", "max_tokens": 32, "temperature": 0}'

  exit codes: 0 stopped with Ctrl-C; 2 bad flags, workdir or a taken port (one line on
  stderr); 1 other failure
  """
  args = Args(argv, flags=("workdir", "host", "port", "slots", "max_len", "chunk", "step",
                           "model_name", "max_prompt_tokens", "max_tokens", "max_body_bytes",
                           "max_waiting"))
  workdir = args.flags.get("workdir")
  if not workdir:
    raise UserError("jaxtrain serve needs --workdir=DIR (a workdir or an HF LLaMA directory)")
  ints = {name: _number(args, name, int, None)
          for name in ("port", "slots", "max_len", "chunk", "step", "max_prompt_tokens",
                       "max_tokens", "max_body_bytes", "max_waiting")}
  for name, value in ints.items():
    if value is not None and value < (0 if name in ("port", "step") else 1):
      raise UserError(f"--{name.replace('_', '-')}={value} is out of range")
  from jaxtrain.serving import server  # pylint: disable=import-outside-toplevel
  limits = server.Limits(max_prompt_tokens=ints["max_prompt_tokens"],
                         max_tokens=ints["max_tokens"],
                         max_body_bytes=ints["max_body_bytes"] or 1 << 20,
                         max_waiting=ints["max_waiting"] or 1024)
  server.serve(workdir, host=args.flags.get("host", "127.0.0.1"),
               port=8000 if ints["port"] is None else ints["port"], slots=ints["slots"] or 8,
               max_len=ints["max_len"], chunk=ints["chunk"] or 8, step=ints["step"],
               model_name=args.flags.get("model_name"), limits=limits)


def cmd_bench(argv):
  """Benchmark serving with vLLM's metrics (TTFT, TPOT, ITL, E2EL, throughputs).

  usage: jaxtrain bench serve --url=URL [flags]        (any OpenAI-compatible server)
         jaxtrain bench serve --workdir=DIR [flags]    (starts ours in-process on 127.0.0.1)

  Streams --num-prompts random prompts of --random-input-len token ids, each asking for exactly
  --random-output-len tokens, and prints vLLM's table (mean, median, std, p99 of each latency)
  and the decode memory bandwidth achieved. Definitions: docs/serving.md.

  flags:
    --url=URL                  a running server, e.g. http://127.0.0.1:8000
    --workdir=DIR              instead of --url: serve this workdir or HF directory in-process
    --model=NAME               the model to ask for (default the first of /v1/models)
    --num-prompts=N            requests (default 100)
    --random-input-len=N       prompt tokens per request (default 128)
    --random-output-len=N      output tokens per request (default 128)
    --request-rate=R           Poisson arrivals at R requests/s (default inf: all at once)
    --max-concurrency=N        at most N requests in flight (default no limit)
    --seed=S                   prompts and arrivals (default 0)
    --result-file=FILE         also write the results as JSON
    --model-bytes=N            weight bytes, for the bandwidth with a non-jaxtrain server
    --kv-bytes-per-token=N     KV-cache bytes per token, likewise
    --device-bandwidth-gbs=G   the device's bandwidth when jaxtrain/hardware.py has none (CPU)
    --vocab-size=N             random ids below N (default the server's, else 1000)
    --prompt-type=ids|text     token-id prompts (default) or random text, for servers that take
                               text only (needs --tokenizer, or --workdir's own)
    --tokenizer=DIR            a workdir or HF directory whose tokenizer makes the text prompts
    --timeout=S                per-request timeout in seconds (default 600)
    --slots=N, --max-len=N, --chunk=N, --step=N   with --workdir: as for jaxtrain serve

  examples:
    jaxtrain bench serve --workdir=runs/35m --num-prompts=32 --random-input-len=64 \\
      --random-output-len=64 --result-file=bench.json
    jaxtrain bench serve --url=http://127.0.0.1:8000 --request-rate=4 --max-concurrency=8

  exit codes: 0 printed; 2 bad flags, unreachable server or a failed test request (one line on
  stderr); 1 other failure
  """
  args = Args(argv, flags=("url", "workdir", "model", "num_prompts", "random_input_len",
                           "random_output_len", "request_rate", "max_concurrency", "seed",
                           "result_file", "model_bytes", "kv_bytes_per_token",
                           "device_bandwidth_gbs", "vocab_size", "timeout", "prompt_type",
                           "tokenizer", "slots", "max_len", "chunk", "step"))
  usage = "usage: jaxtrain bench serve --url=URL | --workdir=DIR [flags]"
  if args.positional != ["serve"]:
    if not args.positional:
      raise UserError(f"jaxtrain bench needs a benchmark ({usage})")
    word = " ".join(args.positional)
    raise UserError(f"unknown benchmark {word!r}{suggest(word, ['serve'])} ({usage})")
  url, workdir = args.flags.get("url"), args.flags.get("workdir")
  if bool(url) == bool(workdir):
    raise UserError(f"jaxtrain bench serve needs exactly one of --url and --workdir ({usage})")
  kwargs = dict(
      model=args.flags.get("model"), num_prompts=_number(args, "num_prompts", int, 100),
      input_len=_number(args, "random_input_len", int, 128),
      output_len=_number(args, "random_output_len", int, 128),
      request_rate=_number(args, "request_rate", float, float("inf")),
      max_concurrency=_number(args, "max_concurrency", int, None),
      seed=_number(args, "seed", int, 0), result_file=args.flags.get("result_file"),
      vocab_size=_number(args, "vocab_size", int, None),
      model_bytes=_number(args, "model_bytes", int, None),
      kv_bytes_per_token=_number(args, "kv_bytes_per_token", int, None),
      device_bandwidth_gbs=_number(args, "device_bandwidth_gbs", float, None),
      timeout=_number(args, "timeout", float, 600.0),
      prompt_type=args.flags.get("prompt_type", "ids"), tokenizer=args.flags.get("tokenizer"))
  from jaxtrain.serving import bench  # pylint: disable=import-outside-toplevel
  if url:
    for name in ("slots", "max_len", "chunk", "step"):
      if name in args.flags:
        raise UserError(f"--{name.replace('_', '-')} only applies with --workdir")
    bench.run_bench(url=url, **kwargs)
  else:
    bench.bench_workdir(workdir, slots=_number(args, "slots", int, 8),
                        max_len=_number(args, "max_len", int, None),
                        chunk=_number(args, "chunk", int, 8), step=_number(args, "step", int, None),
                        **kwargs)
def cmd_study(argv):
  """Compare optimizers fairly: an lr grid bracketed on both sides, several seeds, full decay.

  usage: jaxtrain study [--config=FILE[:ARG]] [--config.KEY=VALUE ...] --optimizers=A,B,...
                        [--seeds=N] [--lrs=LR,LR,...] [--steps=N] [--max-extend=N] --workdir=DIR

  Every (optimizer, lr, seed) is an ordinary training run in DIR/OPTIMIZER/lrLR/seedS: finished
  runs are skipped and unfinished ones resume, so the same command continues a study. Each
  optimizer's lr grid extends itself while the best lr is at an edge. The lr decays to 0 at the
  last step (the config's cosine or wsd schedule). The report, per optimizer at its best lr
  (final validation loss, mean and spread over seeds; steps, tokens, FLOPs and wall time to reach
  the tuned AdamW's final loss), goes to DIR/study.md, DIR/study.json and DIR/study.png.
  Details and a measured study: docs/optimizers.md.

  flags:
    --config=FILE[:ARG]  the model, data and training config (default configs/default.py)
    --config.KEY=VALUE   override any config key (every key: docs/configuration.md)
    --optimizers=LIST    comma-separated, from: adamw, muon, muon_gram (Gram Newton-Schulz),
                         normuon, muonh (Muon Hyperball), adamh (Adam Hyperball), muonclip
                         (Muon + QK-clip at tau 100)
    --seeds=N            seeds 0..N-1 per lr (default 2)
    --lrs=LIST           initial lr grid, for every optimizer (1e-3,2e-3,4e-3) or per optimizer
                         (adamw:1e-3,2e-3/muon:0.01,0.02); default: the reference lr times
                         1/2, 1, 2 (optimizer.lr; 0.02, an angle, for the Hyperball variants)
    --steps=N            train.steps of every run (default the config's)
    --max-extend=N       at most N lrs added beyond each edge of a grid (default 3)
    --workdir=DIR        the study's directory (required)

  examples:
    jaxtrain study --config=configs/study.py --optimizers=adamw,muon --seeds=3 --workdir=runs/study
    jaxtrain study --config=configs/llama.py:35m --optimizers=adamw,muon,muonh --seeds=2 \
        --lrs=adamw:1e-3,2e-3,4e-3/muon:2e-3,4e-3,8e-3/muonh:0.01,0.02,0.04 --workdir=runs/s35

  exit codes: 0 study complete and report written; 2 bad flags or config (one line on stderr,
  before anything compiles); 1 preempted (re-run the same command to continue) or other failure
  """
  from jaxtrain import study  # pylint: disable=import-outside-toplevel
  args = Args(argv, flags=("optimizers", "seeds", "lrs", "steps", "max_extend", "workdir"))
  if args.positional:
    raise UserError(f"jaxtrain study takes no positional arguments, got {args.positional[0]!r}")
  workdir = args.flags.get("workdir")
  if not workdir or workdir == "true":
    raise UserError("jaxtrain study needs --workdir=DIR (where the runs and the report go)")
  if "optimizers" not in args.flags:
    raise UserError("jaxtrain study needs --optimizers=NAME,NAME (e.g. adamw,muon)")
  names = study.parse_optimizers(args.flags["optimizers"])
  seeds = _number(args, "seeds", int, 2)
  if seeds < 1:
    raise UserError(f"--seeds={seeds} must be >= 1")
  steps = _number(args, "steps", int, None)
  if steps is not None and steps < 1:
    raise UserError(f"--steps={steps} must be >= 1")
  max_extend = _number(args, "max_extend", int, 3)
  if max_extend < 0:
    raise UserError(f"--max-extend={max_extend} must be >= 0")
  lrs = study.parse_lrs(args.flags["lrs"], names) if "lrs" in args.flags else None
  cfg = args.load_config()
  report = study.run_study(cfg, names, seeds, workdir, lrs=lrs, steps=steps,
                           max_extend=max_extend)
  print(study.format_markdown(report))
  print(f"report: {os.path.join(workdir, 'study.md')}, study.json, study.png")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "info": cmd_info, "data": cmd_data,
            "convert": cmd_convert, "compare": cmd_compare, "generate": cmd_generate,
            "serve": cmd_serve, "bench": cmd_bench, "study": cmd_study}


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
  from jaxtrain.errors import RunFailure  # pylint: disable=import-outside-toplevel
  from jaxtrain.trainer import Preempted  # pylint: disable=import-outside-toplevel
  try:
    COMMANDS[verb](rest)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RunFailure as e:  # Non-finite loss, a checkpoint that could not be written.
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:
    if e.errno in _DISK_ERRNOS:
      what = ("metrics or checkpoints could not be written; the last complete checkpoint is "
              "intact" if verb == "train" else "a file could not be written")
      print(f"error: {e} ({what}: free space and re-run the same command)", file=sys.stderr)
      return 1
    if e.filename is None:
      raise
    # A path the command was given or derived that it cannot use (a file where a directory
    # should be, no permission): the message names it.
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
