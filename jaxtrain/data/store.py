"""Preparation: corpus -> tokenizer -> token shards, streamed, parallel, resumable, cached on disk.

Tokens are computed at preparation rather than in the loader: byte-level BPE encodes about 1 MB
of text (a quarter million tokens) per second per core on our 2-core development machine, and that
core is wanted by training; reading, packing and batching prepared tokens runs at millions of
tokens per second (benchmarks/data_loader.py).

Layout under `data.data_dir`:

    jaxtrain_stdlib/<config>/1.0.0/          the default corpus as a TFDS dataset (ArrayRecord)
    tokens-v2/<corpus key>/<tokenizer key>/  tokenizer.json or tokenizer.model (+ config),
                                             token_bytes.npy (byte-level tokenizers only),
                                             units/<unit>/{train,validation}-<k>.array_record
                                             + done.json, fixup/ (tiny corpora, see _finish),
                                             stats.json (written last: its presence = done)

A unit is a run of input files of about 64 MB (`corpus.UNIT_BYTES`; the whole corpus for
`default`, `tfds:` and `max_docs`). It streams
through its documents once, sends each to train or validation by the hash of its name, tokenizes
them in bounded chunks and writes its own shards, closed past `data.shard_mb`; its directory is
renamed into place only when complete. So memory does not grow with the corpus, units run in
`data.prepare_workers` processes (and on several hosts, each starting with its own share), and a
killed preparation redoes only the units that had not finished.

Each ArrayRecord record is one document: a tag byte, the token ids (uint16 when the vocabulary
fits, else int32) and, only when the tag says so, int32 bytes per token. Byte-level tokenizers
give bytes per token from their vocabulary (token_bytes.npy), so most records carry ids alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import socket
from collections.abc import Iterator

import numpy as np

from jaxtrain import metrics
from jaxtrain.data import corpus as corpus_lib
from jaxtrain.data import tokenizer as tokenizer_lib
from jaxtrain.errors import UserError

# Bump when the record layout or the preparation changes: old caches are then ignored.
FORMAT_VERSION = 2
# group_size:1 makes every record readable on its own (random access for the global shuffle).
_RECORD_OPTIONS = 'group_size:1,zstd:1'
# Documents are tokenized in chunks of about this many characters (bounded memory, native batch).
_CHUNK_CHARS = 4 << 20
STATS_FILE = 'stats.json'
# Bytes in data.shard_mb's unit (a module constant so that tests can make shards small).
_MB = 1 << 20
_DONE_FILE = 'done.json'
_TOKENIZER_DONE = 'tokenizer.done'
_TABLE_FILE = 'token_bytes.npy'
# Record tags: ids only (bytes per token from the vocabulary table), or ids then bytes per token.
_IDS_ONLY, _WITH_BYTES = 0, 1

_tables: dict[str, np.ndarray | None] = {}


def _load_table(directory: pathlib.Path) -> np.ndarray | None:
  key = str(directory)
  if key not in _tables:
    path = directory / _TABLE_FILE
    _tables[key] = np.load(path) if path.is_file() else None
  return _tables[key]


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

  def split_paths(self, split: str) -> list[str]:
    """The split's shards, in the order that defines record indices (units, then shards)."""
    if split not in self.splits:
      raise UserError(f'split {split!r} does not exist (choose one of {sorted(self.splits)})')
    return [str(self.directory / name) for name in self.info['shards'][split]]

  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.load(self.directory)

  def decode_record(self, record: bytes) -> np.ndarray:
    """A stored document as a [2, n] int32 array: token ids, then bytes per token."""
    return decode_record(record, self.info['id_dtype'], _load_table(self.directory))


def decode_record(record: bytes, id_dtype: str, table: np.ndarray | None) -> np.ndarray:
  dtype = np.dtype(id_dtype).newbyteorder('<')
  tag = record[0]
  if tag == _IDS_ONLY:
    ids = np.frombuffer(record, dtype=dtype, offset=1)
    return np.stack([ids.astype(np.int32), table[ids]])
  n = (len(record) - 1) // (dtype.itemsize + 4)
  out = np.empty((2, n), np.int32)
  out[0] = np.frombuffer(record, dtype=dtype, count=n, offset=1)
  out[1] = np.frombuffer(record, dtype='<i4', count=n, offset=1 + n * dtype.itemsize)
  return out


def encode_record(ids: np.ndarray, num_bytes: np.ndarray, id_dtype: str,
                  table: np.ndarray | None) -> bytes:
  dtype = np.dtype(id_dtype).newbyteorder('<')
  if table is not None and np.array_equal(table[ids], num_bytes):
    return bytes([_IDS_ONLY]) + ids.astype(dtype).tobytes()
  return bytes([_WITH_BYTES]) + ids.astype(dtype).tobytes() + num_bytes.astype('<i4').tobytes()


def _id_dtype(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 1 << 16 else 'int32'


def _tokenizer_key(spec: str, vocab_size: int) -> str:
  """Cache key of `data.tokenizer`: BPE depends on the vocab size, a file on its contents and
  on the tokenizer_config.json beside a tokenizer.json (its eos_token is the separator)."""
  if spec == 'bpe':
    return f'bpe-v{vocab_size}'
  path = pathlib.Path(os.path.expanduser(spec))
  if path.is_dir():
    path = tokenizer_lib.saved_file(path) or path
  digest = hashlib.sha256()
  try:
    digest.update(path.read_bytes())
    config = path.parent / 'tokenizer_config.json'
    if path.suffix == '.json' and config.is_file():
      digest.update(b'\0' + config.read_bytes())
  except OSError as e:
    raise UserError(f'data.tokenizer: cannot read {spec} ({e.strerror})') from None
  digest = digest.hexdigest()[:16]
  kind = 'spm' if path.suffix == '.model' else 'hf'
  return f'{kind}-{digest}'


@contextlib.contextmanager
def _locked(path: pathlib.Path, blocking: bool = True) -> Iterator[bool]:
  """flock on `path`: serialises processes on this machine. Yields False if not blocking and busy."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _load(directory: pathlib.Path) -> Prepared | None:
  try:
    info = json.loads((directory / STATS_FILE).read_text())
  except (OSError, ValueError):
    return None
  return Prepared(directory, info) if info.get('format') == FORMAT_VERSION else None


def _write_json(path: pathlib.Path, obj) -> None:
  """Atomically (write, then rename): a reader sees the whole file or none."""
  metrics.write_atomically(str(path), json.dumps(obj, indent=2) + '\n')


def worker_count(requested: int) -> int:
  """`data.prepare_workers`, 0 meaning one per core this process may use."""
  if requested:
    return requested
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def is_prepared(data_cfg, vocab_size: int) -> bool:
  """Whether `prepare` would only read the cache (the bpe tokenizer of a mixture's later sources
  is the first one's, so those report False until the first is prepared)."""
  data_dir = pathlib.Path(os.path.expanduser(data_cfg.data_dir))
  corpus = corpus_lib.open_corpus(
      data_cfg.source, data_dir=str(data_dir), text_field=data_cfg.text_field,
      max_docs=data_cfg.max_docs, validation_fraction=data_cfg.validation_fraction)
  root = data_dir / f'tokens-v{FORMAT_VERSION}' / corpus.key
  try:
    return _load(root / _tokenizer_key(data_cfg.tokenizer, vocab_size)) is not None
  except UserError:
    return False


def prepare(data_cfg, vocab_size: int, *, process_index: int = 0,
            process_count: int = 1) -> Prepared:
  """Returns the prepared dataset for `data_cfg`, building whatever is missing.

  Process `process_index` of `process_count` starts with its own share of the units, then takes
  any unit nobody has finished, so the job completes whether or not the other processes help.
  """
  data_dir = pathlib.Path(os.path.expanduser(data_cfg.data_dir))
  corpus = corpus_lib.open_corpus(
      data_cfg.source, data_dir=str(data_dir), text_field=data_cfg.text_field,
      max_docs=data_cfg.max_docs, validation_fraction=data_cfg.validation_fraction)
  root = data_dir / f'tokens-v{FORMAT_VERSION}' / corpus.key
  directory = root / _tokenizer_key(data_cfg.tokenizer, vocab_size)
  prepared = _load(directory)
  if prepared is None:
    lock = root.parent / f'.{corpus.key}.lock'
    with _locked(lock):
      tokenizer = _prepare_tokenizer(corpus, data_cfg, vocab_size, directory)
    if _load(directory) is None:
      _run_units(corpus, directory, tokenizer, data_cfg, process_index, process_count)
    with _locked(lock):
      prepared = _load(directory)  # another process may have finished while we worked
      if prepared is None:
        prepared = _finish(corpus, data_cfg, vocab_size, directory, tokenizer)
  _check_vocab(prepared, data_cfg.tokenizer, vocab_size)
  return prepared


def _check_vocab(prepared: Prepared, spec: str, vocab_size: int) -> None:
  size = prepared.info['tokenizer_vocab_size']
  if size > vocab_size:
    raise UserError(f'data.tokenizer: {spec} has {size} tokens, more than the model vocab_size '
                    f'{vocab_size}')


def _prepare_tokenizer(corpus, data_cfg, vocab_size: int,
                       directory: pathlib.Path) -> tokenizer_lib.Tokenizer:
  """Trains (BPE: one streamed pass over the train split) or loads the tokenizer, once."""
  if (directory / _TOKENIZER_DONE).is_file():
    return tokenizer_lib.load(directory)
  if data_cfg.tokenizer == 'bpe':
    texts = (doc.text for doc in corpus.documents('train'))
    tokenizer = tokenizer_lib.train_bpe(texts, vocab_size)
  else:
    tokenizer = tokenizer_lib.load(data_cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
      raise UserError(f'data.tokenizer: {data_cfg.tokenizer} has {tokenizer.vocab_size} '
                      f'tokens, more than the model vocab_size {vocab_size}')
  directory.mkdir(parents=True, exist_ok=True)
  host = socket.gethostname()
  for stale in directory.glob(f'.tokenizer-{host}-*'):  # a killed run's (we hold the lock)
    shutil.rmtree(stale, ignore_errors=True)
  tmp = directory / f'.tokenizer-{host}-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  tokenizer.save(tmp)
  if tokenizer.byte_table is not None:
    np.save(tmp / _TABLE_FILE, tokenizer.byte_table)
  for path in sorted(tmp.iterdir()):
    os.replace(path, directory / path.name)
  tmp.rmdir()
  (directory / _TOKENIZER_DONE).write_text('')
  return tokenizer_lib.load(directory)


def _unit_dir(directory: pathlib.Path, unit: int) -> pathlib.Path:
  return directory / 'units' / f'{unit:05d}'


def _run_units(corpus, directory: pathlib.Path, tokenizer, data_cfg, process_index: int,
               process_count: int) -> None:
  units = corpus.units()
  # Own share first, then everyone else's, so that a process alone still finishes the job.
  order = units[process_index::process_count] + [
      u for i, u in enumerate(units) if i % process_count != process_index]
  todo = [u for u in order if not (_unit_dir(directory, u) / _DONE_FILE).is_file()]
  shard_bytes = data_cfg.shard_mb * _MB
  workers = min(worker_count(data_cfg.prepare_workers), len(todo))
  if workers <= 1 or not corpus.parallel:
    for unit in todo:
      _claim_and_write(corpus, unit, directory, tokenizer, shard_bytes)
    return
  # spawn: the caller may have started JAX or threads, which fork would copy in a broken state.
  # An executor rather than a Pool: a worker that dies is an error here, not a silent respawn.
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                              initargs=(str(directory),)) as pool:
    try:
      for future in concurrent.futures.as_completed(
          [pool.submit(_worker_write, (corpus, u, str(directory), shard_bytes)) for u in todo]):
        future.result()
    except concurrent.futures.process.BrokenProcessPool:
      raise UserError('data.prepare_workers: a preparation worker died (killed, or a script '
                      "that calls prepare outside `if __name__ == '__main__':`, which spawned "
                      'workers re-run); set data.prepare_workers=1 to prepare in this '
                      'process') from None
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise


_worker_tokenizer = None


def _worker_init(directory: str) -> None:
  """Each worker tokenizes on one core: the workers are the parallelism, and HF tokenizers'
  own threads on every core in every worker would only fight over them."""
  global _worker_tokenizer  # pylint: disable=global-statement
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  os.environ['RAYON_NUM_THREADS'] = '1'
  _worker_tokenizer = tokenizer_lib.load(directory)


def _worker_write(args) -> None:
  corpus, unit, directory, shard_bytes = args
  _claim_and_write(corpus, unit, pathlib.Path(directory), _worker_tokenizer, shard_bytes)


def _claim_and_write(corpus, unit: int, directory: pathlib.Path, tokenizer,
                     shard_bytes: int) -> None:
  final = _unit_dir(directory, unit)
  with _locked(directory / 'units' / f'.{unit:05d}.lock'):
    if not (final / _DONE_FILE).is_file():
      # What a killed run of this unit on this machine left behind (we hold the unit's lock).
      for stale in final.parent.glob(f'.tmp-{final.name}-{socket.gethostname()}-*'):
        shutil.rmtree(stale, ignore_errors=True)
      write_unit(corpus, unit, directory, tokenizer, shard_bytes)


def write_unit(corpus, unit: int, directory: pathlib.Path, tokenizer,
               shard_bytes: int) -> dict:
  """Tokenizes one unit into its own shards; the directory appears only once it is complete."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  final = _unit_dir(directory, unit)
  tmp = final.with_name(f'.tmp-{final.name}-{socket.gethostname()}-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  table = tokenizer.byte_table
  id_dtype = _id_dtype(tokenizer.vocab_size)
  done = {'splits': {}, 'shards': {}, 'records': {}, 'extreme': {}}
  writers: dict[str, object] = {}
  sizes: dict[str, int] = {}

  def writer_for(split):
    if split in writers and sizes[split] >= shard_bytes:
      writers.pop(split).close()
    if split not in writers:
      k = len(done['shards'].setdefault(split, []))
      name = f'{split}-{k:04d}.array_record'
      writers[split] = array_record_module.ArrayRecordWriter(str(tmp / name), _RECORD_OPTIONS)
      done['shards'][split].append(name)
      done['records'][split] = done['records'].get(split, []) + [0]
      sizes[split] = 0
    return writers[split]

  def flush(items):
    encoded = tokenizer.encode_with_bytes([doc.text for _, _, doc in items])
    for (split, h, doc), (ids, num_bytes) in zip(items, encoded):
      if len(ids) == 0:
        continue
      if ids.max() >= tokenizer.vocab_size or ids.min() < 0:
        raise UserError(f'data.tokenizer: the tokenizer produced ids outside '
                        f'[0, {tokenizer.vocab_size})')
      record = encode_record(ids, num_bytes, id_dtype, table)
      writer_for(split).write(record)
      sizes[split] += len(record)
      where = [len(done['shards'][split]) - 1, done['records'][split][-1]]
      done['records'][split][-1] += 1
      stats = done['splits'].setdefault(
          split, {'documents': 0, 'tokens': 0, 'bytes': 0, 'replaced_chars': 0})
      stats['documents'] += 1
      stats['tokens'] += len(ids)
      stats['bytes'] += int(num_bytes.sum())
      stats['replaced_chars'] += doc.replaced
      # The train document hashing lowest and the validation one hashing highest: what moves
      # to the other split if that one ends up empty (see _finish).
      if h is not None:
        best = done['extreme'].get(split)
        if best is None or (h < best[0] if split == 'train' else h > best[0]):
          done['extreme'][split] = [h, *where]

  try:
    chunk, chars = [], 0
    for item in corpus.unit_documents(unit):
      chunk.append(item)
      chars += len(item[2].text)
      if chars >= _CHUNK_CHARS:
        flush(chunk)
        chunk, chars = [], 0
    if chunk:
      flush(chunk)
    for w in writers.values():
      w.close()
    writers.clear()
    (tmp / _DONE_FILE).write_text(json.dumps(done, indent=1) + '\n')
    try:
      tmp.rename(final)
    except OSError:  # another host on a shared file system got there first: theirs is as good
      if not (final / _DONE_FILE).is_file():
        raise
  finally:
    for w in writers.values():
      w.close()
    shutil.rmtree(tmp, ignore_errors=True)
  return done


def _finish(corpus, data_cfg, vocab_size: int, directory: pathlib.Path, tokenizer) -> Prepared:
  """Joins the units' shards into the split lists and stats; writes stats.json last."""
  units = corpus.units()
  dones = {}
  for unit in units:
    try:
      dones[unit] = json.loads((_unit_dir(directory, unit) / _DONE_FILE).read_text())
    except (OSError, ValueError):
      # Units are written before _finish runs; a missing one means it was removed meanwhile.
      _claim_and_write(corpus, unit, directory, tokenizer, data_cfg.shard_mb * _MB)
      dones[unit] = json.loads((_unit_dir(directory, unit) / _DONE_FILE).read_text())
  shards = {s: [] for s in corpus_lib.SPLITS}
  splits = {s: {'documents': 0, 'tokens': 0, 'bytes': 0, 'replaced_chars': 0}
            for s in corpus_lib.SPLITS}
  for unit in units:
    done = dones[unit]
    for split in corpus_lib.SPLITS:
      shards[split] += [f'units/{unit:05d}/{n}' for n in done['shards'].get(split, [])]
      for key, value in done['splits'].get(split, {}).items():
        splits[split][key] += value
  total = sum(s['documents'] for s in splits.values())
  fixup = directory / 'fixup'
  shutil.rmtree(fixup, ignore_errors=True)
  if total == 1 and isinstance(corpus, corpus_lib.LocalCorpus):
    shards, splits = _split_single_document(corpus, tokenizer, fixup)
  elif total >= 2:
    for empty in corpus_lib.SPLITS:
      other = 'validation' if empty == 'train' else 'train'
      if splits[empty]['documents'] == 0:
        candidates = [(d['extreme'][other], u) for u, d in dones.items()
                      if other in d.get('extreme', {})]
        if candidates:
          (_, shard, index), unit = (min if other == 'train' else max)(candidates)
          _move_record(directory, f'units/{unit:05d}/{dones[unit]["shards"][other][shard]}',
                       index, shards, splits, other, empty, _id_dtype(tokenizer.vocab_size))
  for split in corpus_lib.SPLITS:
    if splits[split]['documents'] == 0:
      raise UserError(f'data.source: the {split} split has no documents '
                      f'({corpus.description})')
  info = {
      'format': FORMAT_VERSION,
      'source': data_cfg.source,
      'corpus': corpus.description,
      'tokenizer': data_cfg.tokenizer,
      'vocab_size': vocab_size,
      'tokenizer_vocab_size': tokenizer.vocab_size,
      'eos_id': tokenizer.eos_id,
      'bos_id': tokenizer.bos_id,
      'id_dtype': _id_dtype(tokenizer.vocab_size),
      'splits': splits,
      'shards': shards,
  }
  _write_json(directory / STATS_FILE, info)
  return Prepared(directory, info)


def _read_records(path: pathlib.Path) -> list[bytes]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    return reader.read_all()
  finally:
    reader.close()


def _write_records(path: pathlib.Path, records) -> None:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(str(path), _RECORD_OPTIONS)
  try:
    for r in records:
      writer.write(r)
  finally:
    writer.close()


def _move_record(directory, shard: str, index: int, shards, splits, source: str, target: str,
                 id_dtype: str) -> None:
  """Moves one document from `source` to the empty `target` split, so that both splits exist.

  Happens only in corpora with a handful of documents, so rewriting one shard costs nothing.
  """
  records = _read_records(directory / shard)
  moved = records.pop(index)
  kept_name = f'fixup/{source}-kept.array_record'
  _write_records(directory / kept_name, records)
  _write_records(directory / f'fixup/{target}-0000.array_record', [moved])
  shards[source] = [kept_name if s == shard else s for s in shards[source]]
  if not records:
    shards[source].remove(kept_name)
  shards[target] = [f'fixup/{target}-0000.array_record']
  doc = decode_record(moved, id_dtype, _load_table(directory))
  for split, sign in ((source, -1), (target, 1)):
    splits[split]['documents'] += sign
    splits[split]['tokens'] += sign * doc.shape[1]
    splits[split]['bytes'] += sign * int(doc[1].sum())


def _split_single_document(corpus, tokenizer, fixup: pathlib.Path):
  """A corpus of one document is cut by lines: a train head and a validation tail."""
  (name, doc), = list(corpus.all_documents())
  parts = corpus_lib.split_single(doc.text, corpus.fraction, name)
  id_dtype = _id_dtype(tokenizer.vocab_size)
  shards, splits = {}, {}
  for split in corpus_lib.SPLITS:
    (ids, num_bytes), = tokenizer.encode_with_bytes([parts[split]])
    name = f'{split}-0000.array_record'
    _write_records(fixup / name, [encode_record(ids, num_bytes, id_dtype, tokenizer.byte_table)])
    shards[split] = [f'fixup/{name}']
    splits[split] = {'documents': 1, 'tokens': len(ids), 'bytes': int(num_bytes.sum()),
                     'replaced_chars': doc.replaced if split == 'train' else 0}
  return shards, splits
