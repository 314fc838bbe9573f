"""Data for training and evaluation: corpora, tokenizers and Grain pipelines.

The training loop and the CLI use only the functions below; see docs/data.md for the sources,
tokenizers, cache layout and batch format. Heavy modules (TFDS, Grain, tokenizers) are imported on
first use, so reading a config does not pay for them.
"""

from __future__ import annotations

from jaxtrain.data.config import default_config, validate_config
from jaxtrain.data.tokenizer import Tokenizer

__all__ = ['Tokenizer', 'default_config', 'eval_iterator', 'load_tokenizer', 'prepare',
           'train_iterator', 'validate_config']


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to jax's view of the job, so each host reads its own share without being told."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  return process_index, process_count


def _prepared(data_cfg, vocab_size: int):
  from jaxtrain.data import store  # pylint: disable=g-import-not-at-top
  validate_config(data_cfg)
  return store.prepare(data_cfg, vocab_size)


def prepare(data_cfg, vocab_size: int) -> dict[str, dict[str, int]]:
  """Prepares the corpus, tokenizer and token files (once; later calls read the cache).

  The cache key covers source, max_docs, validation_fraction, tokenizer and (for BPE) vocab_size.
  Returns per split ('train', 'validation'): documents, tokens (EOS separators not counted),
  bytes (UTF-8) and replaced_chars (undecodable input replaced with U+FFFD). Prints nothing.
  """
  return {split: dict(stats) for split, stats in _prepared(data_cfg, vocab_size).splits.items()}


def load_tokenizer(data_cfg, vocab_size: int) -> Tokenizer:
  """The tokenizer the prepared data was made with (preparing first if needed)."""
  return _prepared(data_cfg, vocab_size).tokenizer()


def train_iterator(data_cfg, vocab_size: int, batch_size: int, *, seed: int = 0,
                   process_index: int | None = None, process_count: int | None = None):
  """Endless, checkpointable iterator of this process's training batches.

  Each batch is {'inputs', 'targets': int32 [batch_size, seq_len], 'num_bytes': int32
  [batch_size]}. The order depends on `data.shuffle_seed` and `seed` together. The iterator is a
  `grain.DatasetIterator`: `get_state()` / `set_state()` (JSON-safe, what grain's Orbax
  CheckpointHandler saves) resume it exactly.
  """
  from jaxtrain.data import pipeline  # pylint: disable=g-import-not-at-top
  process_index, process_count = _process(process_index, process_count)
  prepared = _prepared(data_cfg, vocab_size)
  dataset = pipeline.train_dataset(
      prepared, seq_len=data_cfg.seq_len, batch_size=batch_size,
      seed=pipeline.shuffle_seed(data_cfg.shuffle_seed, seed),
      process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)
  return iter(dataset)


def eval_iterator(data_cfg, vocab_size: int, batch_size: int, *, split: str = 'validation',
                  max_batches: int | None = None, process_index: int | None = None,
                  process_count: int | None = None):
  """Deterministic evaluation batches of `split`: an iterable that restarts on every `iter()`.

  Batches hold 'inputs', 'targets', 'num_bytes' as in training plus 'mask' (int32 [batch_size,
  seq_len], 0 on padding); `len()` is the number of batches, the same on every process.
  """
  from jaxtrain.data import pipeline  # pylint: disable=g-import-not-at-top
  process_index, process_count = _process(process_index, process_count)
  prepared = _prepared(data_cfg, vocab_size)
  return pipeline.EvalBatches(
      prepared, split, seq_len=data_cfg.seq_len, batch_size=batch_size, max_batches=max_batches,
      process_index=process_index, process_count=process_count)
