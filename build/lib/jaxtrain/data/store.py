"""Preparation: corpus -> tokenizer -> token files, done once and cached on disk.

Tokens are computed at preparation rather than in the loader: byte-level BPE encodes about 1 MB
of text (a quarter million tokens) per second per core on our 2-core development machine, and that
core is wanted by training; reading, packing and batching prepared tokens runs at millions of
tokens per second (benchmarks/data_loader.py).

Layout under `data.data_dir`:

    jaxtrain_stdlib/<config>/1.0.0/          the default corpus as a TFDS dataset (ArrayRecord)
    tokens-v1/<corpus key>/<tokenizer key>/  tokenizer.json or tokenizer.model (+ config),
                                             train.array_record, validation.array_record,
                                             stats.json (written last: its presence = done)

Each ArrayRecord record is one document: int32 token ids followed by int32 bytes per token
(see tokenizer.byte_counts), so any window of tokens knows the UTF-8 bytes it covers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator

import numpy as np

from jaxtrain.data import corpus as corpus_lib
from jaxtrain.data import tokenizer as tokenizer_lib
from jaxtrain.errors import UserError

# Bump when the record layout or the preparation changes: old caches are then ignored.
FORMAT_VERSION = 1
# group_size:1 makes every record readable on its own (random access for the global shuffle).
_RECORD_OPTIONS = 'group_size:1,zstd:1'
# Documents are tokenized in chunks of about this many characters (bounded memory, native batch).
_CHUNK_CHARS = 4 << 20
STATS_FILE = 'stats.json'


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared dataset: where its files are and what `stats.json` says about them."""

  directory: pathlib.Path
  info: dict

  @property
  def splits(self) -> dict[str, dict[str, int]]:
    return self.info['splits']

  @property
  def eos_id(self) -> int:
    return self.info['eos_id']

  def split_path(self, split: str) -> pathlib.Path:
    if split not in self.splits:
      raise UserError(f'split {split!r} does not exist (choose one of {sorted(self.splits)})')
    return self.directory / f'{split}.array_record'

  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.load(self.directory)


def decode_record(record: bytes) -> np.ndarray:
  """A stored document as a [2, n] int32 array: token ids, then bytes per token."""
  return np.frombuffer(record, dtype='<i4').reshape(2, -1)


def _encode_record(ids: np.ndarray, num_bytes: np.ndarray) -> bytes:
  return np.stack([ids, num_bytes]).astype('<i4').tobytes()


def _tokenizer_key(spec: str, vocab_size: int) -> str:
  """Cache key of `data.tokenizer`: BPE depends on the vocab size, a file on its contents only."""
  if spec == 'bpe':
    return f'bpe-v{vocab_size}'
  path = pathlib.Path(os.path.expanduser(spec))
  if path.is_dir():
    path = next((path / n for n in ('tokenizer.json', 'tokenizer.model') if (path / n).is_file()),
                path)
  try:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
  except OSError as e:
    raise UserError(f'data.tokenizer: cannot read {spec} ({e.strerror})') from None
  kind = 'spm' if path.suffix == '.model' else 'hf'
  return f'{kind}-{digest}'


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
  """Serialises preparation of one corpus across processes on this machine (flock)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _load(directory: pathlib.Path) -> Prepared | None:
  try:
    info = json.loads((directory / STATS_FILE).read_text())
  except (OSError, ValueError):
    return None
  return Prepared(directory, info) if info.get('format') == FORMAT_VERSION else None


def prepare(data_cfg, vocab_size: int) -> Prepared:
  """Returns the prepared dataset for `data_cfg`, building whatever is missing."""
  data_dir = pathlib.Path(os.path.expanduser(data_cfg.data_dir))
  corpus = corpus_lib.open_corpus(
      data_cfg.source, data_dir=str(data_dir), text_field=data_cfg.text_field,
      max_docs=data_cfg.max_docs, validation_fraction=data_cfg.validation_fraction)
  root = data_dir / f'tokens-v{FORMAT_VERSION}' / corpus.key
  directory = root / _tokenizer_key(data_cfg.tokenizer, vocab_size)
  prepared = _load(directory)
  if prepared is not None:
    _check_vocab(prepared, data_cfg.tokenizer, vocab_size)
    return prepared
  with _locked(root.parent / f'.{corpus.key}.lock'):
    prepared = _load(directory)  # another process may have finished while we waited
    if prepared is None:
      prepared = _build(corpus, data_cfg, vocab_size, directory)
  _check_vocab(prepared, data_cfg.tokenizer, vocab_size)
  return prepared


def _check_vocab(prepared: Prepared, spec: str, vocab_size: int) -> None:
  size = prepared.info['tokenizer_vocab_size']
  if size > vocab_size:
    raise UserError(f'data.tokenizer: {spec} has {size} tokens, more than the model vocab_size '
                    f'{vocab_size}')


def _build(corpus, data_cfg, vocab_size: int, directory: pathlib.Path) -> Prepared:
  """Writes everything into a temporary directory, then renames it into place."""
  tmp = directory.with_name(f'.tmp-{directory.name}-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    if data_cfg.tokenizer == 'bpe':
      texts = (doc.text for doc in corpus.documents('train'))
      tokenizer = tokenizer_lib.train_bpe(texts, vocab_size)
    else:
      tokenizer = tokenizer_lib.load(data_cfg.tokenizer)
      if tokenizer.vocab_size > vocab_size:
        raise UserError(f'data.tokenizer: {data_cfg.tokenizer} has {tokenizer.vocab_size} '
                        f'tokens, more than the model vocab_size {vocab_size}')
    tokenizer.save(tmp)
    splits = {s: _write_split(corpus, s, tokenizer, tmp / f'{s}.array_record')
              for s in corpus_lib.SPLITS}
    info = {
        'format': FORMAT_VERSION,
        'source': data_cfg.source,
        'corpus': corpus.description,
        'tokenizer': data_cfg.tokenizer,
        'vocab_size': vocab_size,
        'tokenizer_vocab_size': tokenizer.vocab_size,
        'eos_id': tokenizer.eos_id,
        'bos_id': tokenizer.bos_id,
        'splits': splits,
    }
    (tmp / STATS_FILE).write_text(json.dumps(info, indent=2) + '\n')
    try:
      tmp.rename(directory)
    except OSError:  # another host on a shared file system got there first: theirs is as good
      if _load(directory) is None:
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return Prepared(directory, info)


def _write_split(corpus, split: str, tokenizer: tokenizer_lib.Tokenizer,
                 path: pathlib.Path) -> dict[str, int]:
  """Tokenizes one split into `path`; returns its documents, tokens, bytes and replaced chars."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  stats = {'documents': 0, 'tokens': 0, 'bytes': 0, 'replaced_chars': 0}
  writer = array_record_module.ArrayRecordWriter(str(path), _RECORD_OPTIONS)

  def flush(docs):
    for doc, (ids, num_bytes) in zip(docs, tokenizer.encode_with_bytes([d.text for d in docs])):
      if len(ids) == 0:
        continue
      if ids.max() >= tokenizer.vocab_size or ids.min() < 0:
        raise UserError(f'data.tokenizer: the tokenizer produced ids outside '
                        f'[0, {tokenizer.vocab_size})')
      writer.write(_encode_record(ids, num_bytes))
      stats['documents'] += 1
      stats['tokens'] += len(ids)
      stats['bytes'] += int(num_bytes.sum())
      stats['replaced_chars'] += doc.replaced

  try:
    chunk, chars = [], 0
    for doc in corpus.documents(split):
      chunk.append(doc)
      chars += len(doc.text)
      if chars >= _CHUNK_CHARS:
        flush(chunk)
        chunk, chars = [], 0
    if chunk:
      flush(chunk)
  finally:
    writer.close()
  if stats['documents'] == 0:
    raise UserError(f'data.source: the {split} split has no documents '
                    f'({corpus.description})')
  return stats

