"""Data for training and evaluation: corpora, tokenizers and Grain pipelines.

The training loop and the CLI use only the functions below; see docs/data.md for the sources,
tokenizers, cache layout and batch format. Heavy modules (TFDS, Grain, tokenizers) are imported on
first use, so reading a config does not pay for them.
"""

from __future__ import annotations

from jaxtrain.data.config import default_config, validate_config
from jaxtrain.data.tokenizer import Tokenizer

__all__ = ['Tokenizer', 'default_config', 'eval_iterator', 'eval_iterators', 'is_prepared',
           'load_tokenizer',
           'prepare', 'source_names', 'train_iterator', 'validate_config']


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to jax's view of the job, so each host reads its own share without being told."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  return process_index, process_count


def _source_configs(data_cfg) -> list:
  """One `data.*` section per source of `data.source` (one, or several for a mixture)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxtrain.data.config import split_sources  # pylint: disable=g-import-not-at-top
  out = []
  for one in split_sources(data_cfg.source):
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.source = one
    out.append(cfg)
  return out


def _prepared(data_cfg, vocab_size: int, process_index: int = 0, process_count: int = 1):
  """[(source, Prepared)] for every source of `data.source`, preparing what is missing.

  In a mixture every source uses one tokenizer: with `bpe`, the one trained on the first source
  (the others are tokenized with its saved tokenizer.json).
  """
  from jaxtrain.data import store  # pylint: disable=g-import-not-at-top
  validate_config(data_cfg)
  out = []
  for cfg in _source_configs(data_cfg):
    if out and data_cfg.tokenizer == 'bpe':
      cfg.tokenizer = str(out[0][1].directory / 'tokenizer.json')
    out.append((cfg.source, store.prepare(cfg, vocab_size, process_index=process_index,
                                          process_count=process_count)))
  return out


def source_names(data_cfg) -> list[str]:
  """The sources of `data.source`, in order: the names `eval_iterators` keys its batches by."""
  return [cfg.source for cfg in _source_configs(data_cfg)]


def prepare(data_cfg, vocab_size: int, *, process_index: int = 0,
            process_count: int = 1) -> dict:
  """Prepares the corpus, tokenizer and token shards (once; later calls read the cache).

  The cache key covers source, max_docs, validation_fraction, tokenizer and (for BPE) vocab_size.
  Returns per split ('train', 'validation'): documents, tokens (EOS separators not counted),
  bytes (UTF-8) and replaced_chars (undecodable input replaced with U+FFFD); a mixture's numbers
  are the sums, and 'sources' lists each source's own ({'source', 'weight', 'train',
  'validation'}). On several hosts, process i starts with its share of the files. Prints nothing.
  """
  from jaxtrain.data.config import mixture_weights  # pylint: disable=g-import-not-at-top
  prepared = _prepared(data_cfg, vocab_size, process_index, process_count)
  if len(prepared) == 1:
    return {split: dict(stats) for split, stats in prepared[0][1].splits.items()}
  weights = mixture_weights(data_cfg.weights, len(prepared))
  total = {}
  for _, p in prepared:
    for split, stats in p.splits.items():
      for key, value in stats.items():
        total.setdefault(split, {}).setdefault(key, 0)
        total[split][key] += value
  total['sources'] = [{'source': name, 'weight': w, **{s: dict(v) for s, v in p.splits.items()}}
                      for (name, p), w in zip(prepared, weights)]
  return total


def load_tokenizer(data_cfg, vocab_size: int, *, process_index: int = 0,
                   process_count: int = 1) -> Tokenizer:
  """The tokenizer the prepared data was made with (preparing first if needed).

  A multi-host job that prepares here should pass its process index and count, as for
  `prepare`, so that each host starts with its own share of the files.
  """
  return _prepared(data_cfg, vocab_size, process_index, process_count)[0][1].tokenizer()


def train_iterator(data_cfg, vocab_size: int, batch_size: int, *, seed: int = 0,
                   process_index: int | None = None, process_count: int | None = None,
                   keep_source: bool = False):
  """Endless, checkpointable iterator of this process's training batches.

  The order does not depend on the number of processes: every process runs the pipeline of the
  global batch (batch_size x process_count rows, all documents) and keeps its rows
  [process_index * batch_size, (process_index + 1) * batch_size), so the global batch of step t
  holds the same rows on any topology and the iterator state (the same on every process)
  restores on another process count. Each process reads every record, which costs little next
  to a training step. Each batch is {'inputs', 'targets': int32 [batch_size, seq_len], 'num_bytes': int32
  [batch_size]}. The order depends on `data.shuffle_seed` and `seed` together. With several
  sources, rows are drawn in the proportions of `data.weights`; `keep_source` adds 'source'
  (int32 [batch_size], the index in data.source). The iterator is a `grain.DatasetIterator`:
  `get_state()` / `set_state()` (JSON-safe, what grain's Orbax CheckpointHandler saves) resume it
  exactly.
  """
  from jaxtrain.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxtrain.data.config import mixture_weights  # pylint: disable=g-import-not-at-top
  process_index, process_count = _process(process_index, process_count)
  prepared = [p for _, p in _prepared(data_cfg, vocab_size, process_index, process_count)]
  dataset = pipeline.train_dataset(
      prepared[0] if len(prepared) == 1 else prepared, seq_len=data_cfg.seq_len,
      batch_size=batch_size * process_count,
      seed=pipeline.shuffle_seed(data_cfg.shuffle_seed, seed), process_index=0, process_count=1,
      worker_count=data_cfg.worker_count,
      weights=mixture_weights(data_cfg.weights, len(prepared)), keep_source=keep_source)
  if process_count > 1:
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    dataset = dataset.map(lambda batch: {k: v[rows] for k, v in batch.items()})
  return iter(dataset)


def is_prepared(data_cfg, vocab_size: int) -> bool:
  """Whether every source of `data.source` is already prepared (a cache hit, nothing to build)."""
  from jaxtrain.data import store  # pylint: disable=g-import-not-at-top
  validate_config(data_cfg)
  return all(store.is_prepared(cfg, vocab_size) for cfg in _source_configs(data_cfg))


def eval_iterators(data_cfg, vocab_size: int, batch_size: int, *, split: str = 'validation',
                   max_batches: int | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> dict:
  """{source: evaluation batches of that source alone}, in data.source order (see eval_iterator).

  What per-source validation loss needs: evaluate each and write one eval line per source.
  `max_batches` bounds each source's batches.
  """
  from jaxtrain.data import pipeline  # pylint: disable=g-import-not-at-top
  process_index, process_count = _process(process_index, process_count)
  return {name: pipeline.EvalBatches(
      prepared, split, seq_len=data_cfg.seq_len, batch_size=batch_size, max_batches=max_batches,
      process_index=process_index, process_count=process_count)
          for name, prepared in _prepared(data_cfg, vocab_size)}


class _Chain:
  """Several evaluation iterables one after the other; `len()` is the sum."""

  def __init__(self, parts):
    self._parts = list(parts)

  def __len__(self) -> int:
    return sum(len(p) for p in self._parts)

  def __iter__(self):
    for part in self._parts:
      yield from part


def eval_iterator(data_cfg, vocab_size: int, batch_size: int, *, split: str = 'validation',
                  max_batches: int | None = None, process_index: int | None = None,
                  process_count: int | None = None):
  """Deterministic evaluation batches of `split`: an iterable that restarts on every `iter()`.

  Batches hold 'inputs', 'targets', 'num_bytes' as in training plus 'mask' (int32 [batch_size,
  seq_len], 0 on padding); `len()` is the number of batches, the same on every process. For a
  mixture, every source's batches one after the other (`max_batches` bounds each source).
  """
  parts = eval_iterators(data_cfg, vocab_size, batch_size, split=split, max_batches=max_batches,
                         process_index=process_index, process_count=process_count)
  return next(iter(parts.values())) if len(parts) == 1 else _Chain(parts.values())
