"""Data loader throughput on the default corpus: tokens/s the training iterator delivers.

    python benchmarks/data_loader.py                      # prepared cache in data.data_dir
    python benchmarks/data_loader.py --fresh              # also time preparation from scratch

Prints a markdown table to paste into docs/data.md or an issue. Compare "loader tokens/s" with the
training step's tokens/s: the loader must be at least 10x faster so that it never shows up.
"""

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time

import jaxtrain.data as data


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--source', default='default')
  parser.add_argument('--tokenizer', default='bpe')
  parser.add_argument('--vocab-size', type=int, default=8192)
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--seq-len', type=int, default=256)
  parser.add_argument('--steps', type=int, default=300, help='batches timed per run')
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--worker-count', type=int, default=0)
  parser.add_argument('--data-dir', default=None, help='default: data.data_dir')
  parser.add_argument('--fresh', action='store_true',
                      help='prepare into an empty temporary data_dir and time it')
  return parser.parse_args(argv)


def loader_tokens_per_sec(cfg, args, seed):
  """Tokens/s over `steps` batches, after a few warm-up batches (threads, first reads)."""
  iterator = data.train_iterator(cfg, args.vocab_size, args.batch_size, seed=seed,
                                 process_index=0, process_count=1)
  try:
    for _ in range(5):
      next(iterator)
    start = time.perf_counter()
    for _ in range(args.steps):
      next(iterator)
    elapsed = time.perf_counter() - start
  finally:
    iterator.close()
  return args.steps * args.batch_size * args.seq_len / elapsed


def eval_tokens_per_sec(cfg, args):
  start = time.perf_counter()
  tokens = sum(int(b['mask'].sum()) for b in data.eval_iterator(
      cfg, args.vocab_size, args.batch_size, process_index=0, process_count=1))
  return tokens / (time.perf_counter() - start)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cfg = data.default_config()
  cfg.source, cfg.tokenizer = args.source, args.tokenizer
  cfg.seq_len, cfg.worker_count = args.seq_len, args.worker_count
  tmp = tempfile.TemporaryDirectory() if args.fresh else None
  if tmp is not None:
    cfg.data_dir = tmp.name
  elif args.data_dir:
    cfg.data_dir = args.data_dir

  start = time.perf_counter()
  stats = data.prepare(cfg, args.vocab_size)
  prepare_s = time.perf_counter() - start

  runs = [loader_tokens_per_sec(cfg, args, seed) for seed in range(args.runs)]
  evals = eval_tokens_per_sec(cfg, args)
  if tmp is not None:
    tmp.cleanup()

  train, val = stats['train'], stats['validation']
  prepare_cell = f'{prepare_s:.1f} s' + ('' if args.fresh else ' (cache)')
  print(f'Data loader, {datetime.date.today()}, Python {platform.python_version()}, '
        f'{platform.machine()}; command: python benchmarks/data_loader.py '
        + ' '.join(sys.argv[1:] if argv is None else argv))
  print()
  print('| source | tokenizer | vocab | train docs / tokens | val docs / tokens | prepare '
        '| batch x seq | loader tokens/s (median of %d) | min - max | eval tokens/s |' % args.runs)
  print('|---|---|---|---|---|---|---|---|---|---|')
  print(f'| {args.source} | {args.tokenizer} | {args.vocab_size} '
        f'| {train["documents"]:,} / {train["tokens"]:,} | {val["documents"]:,} / '
        f'{val["tokens"]:,} | {prepare_cell} | {args.batch_size} x {args.seq_len} '
        f'| {statistics.median(runs):,.0f} | {min(runs):,.0f} - {max(runs):,.0f} '
        f'| {evals:,.0f} |')


if __name__ == '__main__':
  main()
