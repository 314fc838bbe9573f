"""Grain pipelines over prepared token files: packed, sharded, checkpointable training batches and
deterministic evaluation batches.

Training: documents -> this process's share (`[process_index::process_count]`, so hosts read
disjoint documents) -> global shuffle -> endless epochs, each reshuffled -> each document followed
by EOS -> packed end to end into rows of seq_len + 1 tokens (no padding; a document continues in
the next row) -> batches. Row r gives `inputs = row[:-1]`, `targets = row[1:]`.

Packing is ours (`PackIterDataset`) rather than grain's ConcatThenSplitIterDataset: in grain 0.2.18
the latter keeps tuples in its state, and after the JSON round trip of grain's Orbax checkpoint
handler they come back as lists that no longer compare equal to its sentinel, so a restored
iterator silently yields different rows. Our state is two plain integers and the parent's state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from jaxtrain.data import store
from jaxtrain.errors import UserError

# Reading prepared tokens is cheap; a few threads keep the packer fed without crowding the cores.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=128)


class _AppendEos(grain.transforms.Map):
  """Stored record -> [2, n + 1] int32 (ids, bytes per token) ending with EOS, which covers 0 bytes."""

  def __init__(self, prepared: store.Prepared):
    self._prepared = prepared

  def map(self, element: bytes) -> np.ndarray:
    doc = self._prepared.decode_record(element)
    out = np.empty((2, doc.shape[1] + 1), np.int32)
    out[:, :-1] = doc
    out[:, -1] = (self._prepared.eos_id, 0)
    return out


class PackIterDataset(grain.IterDataset):
  """Concatenates [2, n] documents (ids, bytes) and cuts the stream into rows of `row_len` tokens.

  Yields {'inputs', 'targets': int32 [row_len - 1], 'num_bytes': int32}, where num_bytes is the
  UTF-8 size of the text the targets stand for. Nothing is padded or dropped except the
  unfinished last row of a finite stream.
  """

  def __init__(self, parent: grain.IterDataset, row_len: int):
    super().__init__(parent)
    self._row_len = row_len

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._row_len)

  def __str__(self) -> str:
    return f'PackIterDataset(row_len={self._row_len})'


class _PackIterator(grain.DatasetIterator):
  """State: the parent's state before the document being cut, and how far it has been cut.

  Restoring re-reads that one document from the parent and skips `offset` tokens, so a restored
  iterator continues with exactly the row the original would have produced next.
  """

  def __init__(self, parent: grain.DatasetIterator, row_len: int):
    super().__init__(parent)
    self._row_len = row_len
    self._doc = None
    self._doc_state = None
    self._offset = 0

  def __next__(self) -> dict[str, Any]:
    row = np.empty((2, self._row_len), np.int32)
    filled = 0
    while filled < self._row_len:
      if self._doc is None or self._offset == self._doc.shape[1]:
        self._doc_state = self._parent.get_state()
        self._doc = next(self._parent)
        self._offset = 0
      take = min(self._row_len - filled, self._doc.shape[1] - self._offset)
      row[:, filled:filled + take] = self._doc[:, self._offset:self._offset + take]
      filled += take
      self._offset += take
    return {
        'inputs': row[0, :-1],
        'targets': row[0, 1:],
        'num_bytes': row[1, 1:].sum(dtype=np.int32),
    }

  def get_state(self) -> dict[str, Any]:
    if self._doc is None or self._offset == self._doc.shape[1]:
      return {'parent': self._parent.get_state(), 'offset': 0}
    return {'parent': self._doc_state, 'offset': self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._doc = None
    self._offset = 0
    if state['offset']:
      self._doc_state = state['parent']
      self._doc = next(self._parent)
      self._offset = int(state['offset'])


def shuffle_seed(data_seed: int, seed: int) -> int:
  """One 32-bit shuffle seed from `data.shuffle_seed` and the caller's (training) seed."""
  return int(np.random.SeedSequence([data_seed, seed]).generate_state(1)[0])


class MixIterDataset(grain.IterDataset):
  """Interleaves rows of several sources in fixed proportions (a data mixture).

  Row k comes from the source furthest behind its share, the one maximising
  `weight * (k + 1) - rows taken so far` (ties to the first), so after any n rows each source has
  supplied its share to within one row: deterministic, and exact for token shares since every
  row holds seq_len tokens. The state is the rows taken per source plus each source's state.
  Rows gain 'source' (int32, the index in data.source); `train_dataset` drops it before batching.
  """

  def __init__(self, parents: list[grain.IterDataset], weights: list[float]):
    super().__init__(parents)
    self._weights = list(weights)

  def __iter__(self) -> _MixIterator:
    return _MixIterator([p.__iter__() for p in self._parents], self._weights)

  def __str__(self) -> str:
    return f'MixIterDataset(weights={self._weights})'


class _MixIterator(grain.DatasetIterator):

  def __init__(self, parents: list[grain.DatasetIterator], weights: list[float]):
    super().__init__(parents)
    self._weights = weights
    self._taken = [0] * len(parents)

  def __next__(self) -> dict[str, Any]:
    k = sum(self._taken) + 1
    choice = max(range(len(self._weights)),
                 key=lambda i: (self._weights[i] * k - self._taken[i], -i))
    row = next(self._parents[choice])
    self._taken[choice] += 1
    return {**row, 'source': np.int32(choice)}

  def get_state(self) -> dict[str, Any]:
    return {'taken': list(self._taken), 'parents': [p.get_state() for p in self._parents]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._taken = [int(t) for t in state['taken']]
    for parent, parent_state in zip(self._parents, state['parents']):
      parent.set_state(parent_state)


def _rows(prepared: store.Prepared, *, seq_len: int, seed: int, process_index: int,
          process_count: int, num_epochs: int | None) -> grain.IterDataset:
  """One source's packed rows: this process's documents, shuffled over every shard, repeated."""
  source = grain.sources.ArrayRecordDataSource(prepared.split_paths('train'))
  docs = grain.MapDataset.source(source)
  if len(docs) < process_count:
    raise UserError(f'data.source: {len(docs)} training documents cannot be shared by '
                    f'{process_count} processes')
  docs = docs[process_index::process_count].shuffle(seed=seed).repeat(num_epochs)
  docs = docs.map(_AppendEos(prepared))
  return PackIterDataset(docs.to_iter_dataset(_READ_OPTIONS), seq_len + 1)


def _drop_source(row: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in row.items() if k != 'source'}


def train_dataset(prepared: store.Prepared | list[store.Prepared], *, seq_len: int,
                  batch_size: int, seed: int, process_index: int, process_count: int,
                  worker_count: int = 0, num_epochs: int | None = None,
                  weights: list[float] | None = None, keep_source: bool = False
                  ) -> grain.IterDataset:
  """The training pipeline (see the module docstring); endless unless `num_epochs` is given.

  A list of prepared sources is a mixture drawn with `weights` (`MixIterDataset`); each source
  is shuffled with its own seed derived from `seed`. `keep_source` keeps the rows' 'source'
  field (int32 [batch_size]) in the batches.
  """
  if isinstance(prepared, store.Prepared):
    rows = _rows(prepared, seq_len=seq_len, seed=seed, process_index=process_index,
                 process_count=process_count, num_epochs=num_epochs)
  else:
    parts = [_rows(p, seq_len=seq_len, seed=shuffle_seed(seed, i), process_index=process_index,
                   process_count=process_count, num_epochs=num_epochs)
             for i, p in enumerate(prepared)]
    rows = MixIterDataset(parts, weights or [1 / len(parts)] * len(parts))
    if not keep_source:
      rows = rows.map(_drop_source)
  batches = rows.batch(batch_size, drop_remainder=True)
  if worker_count:
    _allow_unparsed_absl_flags()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    # Workers hand batches over in shared memory; plain copies free it at once, instead of at
    # interpreter exit where grain 0.2.18 reports every surviving block as an error.
    batches = batches.map(lambda batch: {k: np.array(v) for k, v in batch.items()})
  return batches


def _allow_unparsed_absl_flags() -> None:
  """grain 0.2.18's worker start reads an absl flag, which fails in programs that never parse
  flags (notebooks, plain scripts): google/grain#1355, fixed after that release. Marking the flags
  parsed keeps their defaults; programs that do parse flags (our CLI) are left alone."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class EvalBatches:
  """Deterministic evaluation batches; each `iter()` starts again from the first batch.

  The split's documents, in stored order and each followed by EOS, form one stream, cut into rows
  of seq_len + 1 tokens that overlap by one token, so every token but the first is a target exactly
  once. Global batch k holds rows [k * G, (k + 1) * G) with G = batch_size * process_count, and
  process p takes its rows p * batch_size onwards; every process yields the same number of batches.
  Rows past the end of the stream, and the tail of the last row, are padded with 0 and masked out:
  `mask` is int32 [B, seq_len], 1 where the target is real.
  """

  def __init__(self, prepared: store.Prepared, split: str, *, seq_len: int, batch_size: int,
               max_batches: int | None, process_index: int, process_count: int):
    self._paths = prepared.split_paths(split)
    self._prepared = prepared
    stats = prepared.splits[split]
    stream_len = stats['tokens'] + stats['documents']  # one EOS per document
    self._num_rows = math.ceil((stream_len - 1) / seq_len) if stream_len > 1 else 0
    self._eos_id = prepared.eos_id
    self._seq_len = seq_len
    self._batch_size = batch_size
    self._process_index = process_index
    self._global_batch = batch_size * process_count
    num_batches = math.ceil(self._num_rows / self._global_batch)
    self._num_batches = num_batches if max_batches is None else min(num_batches, max_batches)

  def __len__(self) -> int:
    return self._num_batches

  def _rows(self) -> Iterator[np.ndarray]:
    """[2, <= seq_len + 1] windows of the stream, at stride seq_len."""
    source = grain.sources.ArrayRecordDataSource(self._paths)
    add_eos = _AppendEos(self._prepared)
    width = self._seq_len + 1
    pending = np.zeros((2, 0), np.int32)
    for i in range(len(source)):
      pending = np.concatenate([pending, add_eos.map(source[i])], axis=1)
      while pending.shape[1] >= width:
        yield pending[:, :width]
        pending = pending[:, self._seq_len:]
    if pending.shape[1] > 1:
      yield pending

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    rows = self._rows()
    b, t = self._batch_size, self._seq_len
    first = self._process_index * b
    for _ in range(self._num_batches):
      batch = {
          'inputs': np.zeros((b, t), np.int32),
          'targets': np.zeros((b, t), np.int32),
          'num_bytes': np.zeros((b,), np.int32),
          'mask': np.zeros((b, t), np.int32),
      }
      for g in range(self._global_batch):
        row = next(rows, None)
        j = g - first
        if row is None or not 0 <= j < b:
          continue
        n = row.shape[1] - 1
        batch['inputs'][j, :n] = row[0, :-1]
        batch['targets'][j, :n] = row[0, 1:]
        batch['num_bytes'][j] = row[1, 1:].sum()
        batch['mask'][j, :n] = 1
      yield batch
