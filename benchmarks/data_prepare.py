"""Preparation at scale: tokens/s and peak memory of `data prepare` for 1 and 2 workers.

    python benchmarks/data_prepare.py --docs 400000 --mb 100          # JSONL shards
    python benchmarks/data_prepare.py --docs 100000 --mb 30 --format parquet --workers 1,2,4

Generates a corpus of `--docs` documents and about `--mb` MB of text in `--files` shards (random
words, deterministic), trains a byte-level BPE tokenizer on a sample and saves it as a
tokenizer.json (so that timing covers tokenizing and writing, as with a user's HF tokenizer),
then prepares the corpus from scratch once per worker count, each in a fresh process, and reads
the prepared shards with the training iterator. Peak RSS is the largest of the preparing process
and its workers (each a separate process, so their sum can be larger); CPU s is the CPU time of
all of them up to the end of preparation (against wall time it shows how many cores the run
actually got on a shared machine). Prints a markdown table.
"""

import argparse
import datetime
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# The jaxtrain of the checkout this script belongs to, even where another one is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORDS = ('the of and to in is was for that with as on by he at from his it an were are which '
          'this be or has had not first one their its new after who they have her she two been '
          'other when there all during into school time may years more most only over city some '
          'world would where later up such used many can state about national out known '
          'university united then made population between river under american team while '
          'also born game series however last film season part group three several since '
          'café naïve über 日本語 données система').split()


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--docs', type=int, default=400_000)
  parser.add_argument('--mb', type=float, default=100.0, help='approximate MB of text')
  parser.add_argument('--files', type=int, default=16, help='shards the corpus is written in')
  parser.add_argument('--format', choices=('jsonl', 'jsonl.gz', 'parquet'), default='jsonl')
  parser.add_argument('--workers', default='1,2', help='comma-separated worker counts')
  parser.add_argument('--vocab-size', type=int, default=8192)
  parser.add_argument('--loader-batches', type=int, default=200)
  parser.add_argument('--dir', default=None, help='where to put the corpus (default: a temp dir)')
  parser.add_argument('--_child', default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def generate(directory, args):
  """Writes the corpus; returns its size in bytes. Words and lengths come from a fixed seed."""
  rng = np.random.default_rng(0)
  words = np.array(_WORDS)
  mean_words = max(1, int(args.mb * 1e6 / args.docs / 6))  # ~6 bytes per word with its space
  per_file = [args.docs // args.files + (i < args.docs % args.files) for i in range(args.files)]
  total = 0
  for f, count in enumerate(per_file):
    lengths = rng.integers(max(1, mean_words // 2), mean_words * 3 // 2 + 1, count)
    picks = rng.integers(0, len(words), int(lengths.sum()))
    texts, start = [], 0
    for n in lengths:
      texts.append(' '.join(words[picks[start:start + n]]))
      start += n
    path = os.path.join(directory, f'part-{f:05d}.{args.format}')
    if args.format == 'parquet':
      import pyarrow as pa  # pylint: disable=import-outside-toplevel
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
      pq.write_table(pa.table({'text': texts}), path, row_group_size=10_000)
    else:
      opener = gzip.open if args.format.endswith('.gz') else open
      with opener(path, 'wt', encoding='utf-8') as out:
        for t in texts:
          out.write(json.dumps({'text': t}, ensure_ascii=False) + '\n')
    total += sum(len(t.encode('utf-8')) for t in texts)
  return total


def child(spec):
  """One preparation in this fresh process; prints its numbers as JSON."""
  import jaxtrain.data as data  # pylint: disable=import-outside-toplevel
  cfg = data.default_config()
  cfg.source, cfg.tokenizer, cfg.data_dir = spec['source'], spec['tokenizer'], spec['data_dir']
  cfg.prepare_workers = spec['workers']
  start = time.perf_counter()
  stats = data.prepare(cfg, spec['vocab_size'])
  prepare_s = time.perf_counter() - start
  cpu_s = sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
              for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  tokens = stats['train']['tokens'] + stats['validation']['tokens']
  it = data.train_iterator(cfg, spec['vocab_size'], 16, seed=0, process_index=0, process_count=1)
  for _ in range(5):
    next(it)
  start = time.perf_counter()
  for _ in range(spec['loader_batches']):
    next(it)
  loader = spec['loader_batches'] * 16 * cfg.seq_len / (time.perf_counter() - start)
  kib = lambda who: resource.getrusage(who).ru_maxrss  # pylint: disable=unnecessary-lambda-assignment
  print(json.dumps({'prepare_s': prepare_s, 'tokens': tokens, 'docs': stats['train']['documents']
                    + stats['validation']['documents'], 'loader': loader,
                    'rss_main_mb': kib(resource.RUSAGE_SELF) / 1024,
                    'cpu_s': cpu_s,
                    'rss_workers_mb': kib(resource.RUSAGE_CHILDREN) / 1024}))


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args._child:  # pylint: disable=protected-access
    child(json.loads(args._child))  # pylint: disable=protected-access
    return
  tmp = tempfile.TemporaryDirectory(dir=args.dir)
  corpus = os.path.join(tmp.name, 'corpus')
  os.makedirs(corpus)
  start = time.perf_counter()
  size = generate(corpus, args)
  gen_s = time.perf_counter() - start

  from jaxtrain.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  sample = []
  first = sorted(os.listdir(corpus))[0]
  if args.format == 'jsonl':
    with open(os.path.join(corpus, first), encoding='utf-8') as f:
      sample = [json.loads(line)['text'] for _, line in zip(range(20_000), f)]
  else:
    sample = [' '.join(_WORDS)] * 100
  tok_dir = os.path.join(tmp.name, 'tokenizer')
  tokenizer_lib.train_bpe(sample, args.vocab_size).save(tok_dir)

  # HF tokenizers run a batch on every core by themselves; a single worker is run both ways, so
  # that the table shows the scaling of workers (each on one core) and what a user gets.
  runs = [(int(w), False) for w in args.workers.split(',')]
  if (1, False) in runs:
    runs.insert(runs.index((1, False)), (1, True))
  rows = []
  for workers, one_thread in runs:
    spec = {'source': corpus, 'tokenizer': os.path.join(tok_dir, 'tokenizer.json'),
            'data_dir': os.path.join(tmp.name, f'data-{workers}-{one_thread}'),
            'workers': workers, 'vocab_size': args.vocab_size,
            'loader_batches': args.loader_batches}
    env = dict(os.environ)
    if one_thread:
      env.update(TOKENIZERS_PARALLELISM='false', RAYON_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, __file__, '--_child', json.dumps(spec)],
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
      sys.exit(f'preparation with {workers} worker(s) failed:\n{proc.stderr}')
    label = f'{workers}' + (' (tokenizer on 1 thread)' if one_thread else
                            ' (tokenizer threads on)' if workers == 1 else '')
    rows.append((workers, label, json.loads(proc.stdout.strip().splitlines()[-1])))
  tmp.cleanup()

  base = rows[0][2]['tokens'] / rows[0][2]['prepare_s']
  command = 'python benchmarks/data_prepare.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
  print(f'Data preparation, {datetime.date.today()}, Python {platform.python_version()}, '
        f'{os.cpu_count()} CPUs; command: {command}')
  print(f'Corpus: {args.docs:,} documents, {size / 1e6:,.0f} MB of text in {args.files} '
        f'{args.format} files (generated in {gen_s:.0f} s); tokenizer.json BPE vocab '
        f'{args.vocab_size}.')
  print()
  print('| workers | documents | tokens | prepare | tokens/s | vs first row | CPU s (all '
        'processes) | peak RSS main | peak RSS worker | loader tokens/s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for workers, label, r in rows:
    rate = r['tokens'] / r['prepare_s']
    worker_rss = f"{r['rss_workers_mb']:,.0f} MB" if workers > 1 else '-'
    print(f"| {label} | {r['docs']:,} | {r['tokens']:,} | {r['prepare_s']:.1f} s | "
          f"{rate:,.0f} | {rate / base:.2f}x | {r['cpu_s']:.1f} | {r['rss_main_mb']:,.0f} MB | "
          f"{worker_rss} | "
          f"{r['loader']:,.0f} |")


if __name__ == '__main__':
  main()
