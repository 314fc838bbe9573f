"""Text corpora: where documents come from, how they are checked, and how they split.

Three kinds of `data.source`, one interface: `key`, `documents(split)` (what BPE training reads),
and the preparation units `units()` / `unit_documents(unit)` -> (split, hash, document);
`parallel` says whether units may go to worker processes.

* `default`: the running interpreter's own standard library `.py` files, registered as the TFDS
  dataset `jaxtrain_stdlib` and written once as ArrayRecord, so training works with no download.
* a path, directory or glob of local `.txt` (one document per file), `.jsonl`, `.jsonl.gz`,
  `.jsonl.zst` (one per line) or `.parquet` (one per row) files, streamed (`sources.py`): they
  already are on disk, so a second text copy would only cost space.
* `tfds:NAME`, any TFDS dataset already prepared as ArrayRecord in `data.data_dir`, read with
  `builder.as_data_source` (TensorFlow-free).

Splits are chosen per document by a hash of its name (relative path, `path:line` for JSONL,
`path:row` for Parquet) as it streams by, so a document keeps its split when others are added or
removed; a corpus of one document is cut by lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import pathlib
import platform
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds  # only tf.data needs TensorFlow, and we never use it

from jaxtrain.data.config import local_source_root, resolve_local_files
from jaxtrain.data.sources import Document, LocalFiles, clean_str as _clean_str, decode_utf8
from jaxtrain.errors import UserError

__all__ = ['Document', 'decode_utf8', 'open_corpus', 'unit_hash', 'SPLITS']

SPLITS = ('train', 'validation')
# Directory names whose .py files are test code, not library code.
_STDLIB_SKIP_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', 'dist-packages',
                               '__pycache__'})


def unit_hash(name: str) -> float:
  """A stable number in [0, 1) for `name`: the same on every host, Python version and run."""
  digest = hashlib.blake2b(name.encode('utf-8'), digest_size=8).digest()
  return int.from_bytes(digest, 'big') / 2.0**64


def choose_validation(names: Sequence[str], fraction: float) -> list[bool]:
  """Which documents go to validation: those whose name hashes below `fraction`.

  With two or more documents both splits get at least one, so that a tiny corpus still evaluates.
  """
  hashes = [unit_hash(n) for n in names]
  is_val = [h < fraction for h in hashes]
  if len(names) >= 2 and not any(is_val):
    is_val[min(range(len(names)), key=hashes.__getitem__)] = True
  if len(names) >= 2 and all(is_val):
    is_val[max(range(len(names)), key=hashes.__getitem__)] = False
  return is_val


def split_single(text: str, fraction: float, name: str) -> dict[str, str]:
  """Cuts the only document of a corpus into a train head and a validation tail, by lines."""
  lines = text.splitlines(keepends=True)
  if len(lines) < 2:
    raise UserError(f'{name}: the corpus is a single one-line document, which cannot be split '
                    'into train and validation')
  n_val = min(len(lines) - 1, max(1, round(len(lines) * fraction)))
  return {'train': ''.join(lines[:-n_val]), 'validation': ''.join(lines[-n_val:])}


# ---------------------------------------------------------------------------------------------
# The embedded default corpus: the Python standard library, as a TFDS dataset.


def stdlib_files() -> tuple[pathlib.Path, list[str]]:
  """The interpreter's standard library root and its non-test .py files, sorted by relative path."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  names = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    rel_dir = pathlib.Path(dirpath).relative_to(root)
    names.extend((rel_dir / f).as_posix() for f in filenames if f.endswith('.py'))
  return root, sorted(names)


def _stdlib_documents(max_docs: int) -> list[tuple[str, Document]]:
  """(relative path, document) of the first `max_docs` non-empty stdlib files (0 = all)."""
  root, names = stdlib_files()
  docs = []
  for name in names:
    try:
      data = (root / name).read_bytes()
    except OSError:  # an unreadable file in a system install is not the user's problem
      continue
    text, replaced = decode_utf8(data)
    if not text.strip():  # many __init__.py files are empty; they teach nothing
      continue
    docs.append((name, Document(text, replaced)))
    if max_docs and len(docs) >= max_docs:
      break
  return docs


@contextlib.contextmanager
def _quiet():
  """Silences TFDS's progress bars and banners: `prepare` must print nothing."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)


@dataclasses.dataclass(eq=False)
class StdlibConfig(tfds.core.BuilderConfig):
  max_docs: int = 0
  validation_fraction: float = 0.02


class JaxtrainStdlib(tfds.core.GeneratorBasedBuilder):
  """The Python standard library's own source files (tests excluded) as text documents.

  Each example: `text` (the file, invalid UTF-8 replaced), `num_bytes` (its UTF-8 size),
  `replaced` (how many characters were replaced) and `path` (relative to the stdlib root). Configs
  are made by `StdlibCorpus`; their name carries the Python version, since each interpreter ships
  a different library.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  # No checksums file to look for. TFDS's code_path probe needs the importlib_resources backport,
  # which tfds 4.9.x only declares for Python < 3.9 (tensorflow/datasets#11212); None skips it.
  code_path = None

  def _info(self):
    # Built directly: dataset_info_from_configs would look for metadata files next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'path': tfds.features.Text(),
            'num_bytes': np.int64,
            'replaced': np.int64,
        }),
        homepage='https://docs.python.org/3/library/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the corpus ships with the interpreter
    cfg = self.builder_config
    docs = _stdlib_documents(cfg.max_docs)
    if len(docs) == 1:
      name, doc = docs[0]
      parts = split_single(doc.text, cfg.validation_fraction, name)
      return {
          'train': self._generate_examples([(name, Document(parts['train'], doc.replaced))]),
          'validation': self._generate_examples([(name, Document(parts['validation'], 0))]),
      }
    is_val = choose_validation([n for n, _ in docs], cfg.validation_fraction)
    return {
        'train': self._generate_examples([d for d, v in zip(docs, is_val) if not v]),
        'validation': self._generate_examples([d for d, v in zip(docs, is_val) if v]),
    }

  def _generate_examples(self, docs):
    for name, doc in docs:
      yield name, {'text': doc.text, 'path': name, 'num_bytes': len(doc.text.encode('utf-8')),
                   'replaced': doc.replaced}

  # TFDS prints banners on stdout; our callers print their own summary.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass


class _OneUnit:
  """Corpora read as one serial unit: every split's documents in order (no parallel prepare)."""

  parallel = False

  def units(self) -> list[int]:
    return [0]

  def unit_documents(self, unit: int) -> Iterator[tuple[str, None, Document]]:
    del unit
    for split in SPLITS:
      for doc in self.documents(split):
        yield split, None, doc


class StdlibCorpus(_OneUnit):
  """The default corpus; `prepare` writes the TFDS dataset into `data_dir` on first use."""

  def __init__(self, data_dir: str, max_docs: int, validation_fraction: float):
    # The full version: a patch release changes library files, so it must not reuse a cache.
    version = f'py{platform.python_version()}'
    self.config_name = f'{version}-docs{max_docs}-val{validation_fraction:g}'
    self.key = f'stdlib-{self.config_name}'
    self.description = f'Python {version[2:]} standard library (.py files, tests excluded)'
    self._data_dir = data_dir
    self._max_docs = max_docs
    self._fraction = validation_fraction
    self._builder = None

  def builder(self):
    if self._builder is None:
      config = StdlibConfig(name=self.config_name, max_docs=self._max_docs,
                            validation_fraction=self._fraction, description=self.description)
      with _quiet():  # TFDS warns about configs made at run time; they are meant to be here
        self._builder = JaxtrainStdlib(data_dir=self._data_dir, config=config,
                                       file_format='array_record')
    return self._builder

  def prepare(self) -> None:
    """Writes the TFDS dataset (ArrayRecord) unless it is already there."""
    builder = self.builder()
    if builder.is_prepared():
      return
    download_config = tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP)
    with _quiet():
      builder.download_and_prepare(download_config=download_config)


  def documents(self, split: str) -> Iterator[Document]:
    self.prepare()
    source = self.builder().as_data_source(split)
    for i in range(len(source)):
      example = source[i]
      yield Document(example['text'].decode('utf-8'), int(example['replaced']))


# ---------------------------------------------------------------------------------------------
# Local .txt / .jsonl files.


UNIT_BYTES = 64 << 20  # input bytes per preparation unit of a local corpus (`LocalCorpus`)


def _group_by_size(sizes: list[int], target: int) -> list[range]:
  """Consecutive indices in groups, each closed as soon as its sizes add up to `target`."""
  groups, start, total = [], 0, 0
  for i, size in enumerate(sizes):
    total += size
    if total >= target:
      groups.append(range(start, i + 1))
      start, total = i + 1, 0
  if start < len(sizes):
    groups.append(range(start, len(sizes)))
  return groups


class LocalCorpus:
  """Documents streamed from local files (see `sources.LocalFiles` for the formats and checks).

  Preparation works in units of consecutive files of about `UNIT_BYTES` (a larger file is a unit
  of its own), so that files can be tokenized by several processes and a killed preparation
  redoes only the units it had not finished. Each unit writes its own shards, so one unit per
  small file made a corpus of 1,500 small files into 4,500 shard files, which training then
  held open at once (past the usual limit of 1,024). With `max_docs` the first N documents in
  file order are wanted, which one sequential unit over every file gives.
  """

  def __init__(self, source: str, text_field: str, max_docs: int, validation_fraction: float):
    files = resolve_local_files(source)
    root = local_source_root(source)
    self.files = LocalFiles(tuple(files), root, text_field)
    self._fraction = self.fraction = validation_fraction
    fingerprint = hashlib.sha256()
    for p in files:
      st = p.stat()
      fingerprint.update(f'{p}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    fingerprint.update(f'{text_field}\0{max_docs}\0{validation_fraction!r}'.encode())
    fingerprint.update(f'units of {UNIT_BYTES}'.encode())  # another grouping: another cache
    self._groups = _group_by_size([p.stat().st_size for p in files], UNIT_BYTES)
    # The key comes from names, sizes and times alone, so a prepared corpus is found again
    # without reading any file; reading and checking waits until documents are asked for.
    self.key = f'local-{fingerprint.hexdigest()[:16]}'
    self.description = f'{len(files)} local file(s) under {root}'
    self._max_docs = max_docs
    self.parallel = not max_docs

  def units(self) -> list[int]:
    return [0] if self._max_docs else list(range(len(self._groups)))

  def _unit_items(self, unit: int) -> Iterator[tuple[str, Document]]:
    if not self._max_docs:
      for i in self._groups[unit]:
        yield from self.files.documents(i)
      return
    count = 0
    for i in range(len(self.files.files)):
      for item in self.files.documents(i):
        yield item
        count += 1
        if count >= self._max_docs:
          return

  def unit_documents(self, unit: int) -> Iterator[tuple[str, float, Document]]:
    """(split, name hash, document) of one unit: the split is decided as the document streams by."""
    for name, doc in self._unit_items(unit):
      h = unit_hash(name)
      yield ('validation' if h < self._fraction else 'train'), h, doc

  def all_documents(self) -> Iterator[tuple[str, Document]]:
    for unit in self.units():
      yield from self._unit_items(unit)

  def documents(self, split: str) -> Iterator[Document]:
    """The split's documents in file order (what BPE training reads), streamed.

    A corpus of a single document is cut by lines (`split_single`); whether there is a second
    document is known once it is seen, so the first is held back until then.
    """
    first = None
    count = 0
    for name, doc in self.all_documents():
      count += 1
      if count == 1:
        first = (name, doc)
        continue
      if count == 2 and (unit_hash(first[0]) < self._fraction) == (split == 'validation'):
        yield first[1]
      if (unit_hash(name) < self._fraction) == (split == 'validation'):
        yield doc
    if count == 1:
      name, doc = first
      part = split_single(doc.text, self._fraction, name)[split]
      yield Document(part, doc.replaced if split == 'train' else 0)


# ---------------------------------------------------------------------------------------------
# Any TFDS dataset already prepared as ArrayRecord.


class TfdsCorpus(_OneUnit):
  """Text from a prepared TFDS dataset (`tfds:NAME`, NAME may carry `/config:version`).

  Train is its `train` split; validation is its `validation` split, else `test`, else a hashed
  `validation_fraction` of train. `max_docs` caps each split. Nothing is downloaded: a dataset that
  is not prepared in `data_dir` is an error.
  """

  def __init__(self, name: str, data_dir: str, text_field: str, max_docs: int,
               validation_fraction: float):
    self._name = name
    try:
      with _quiet():
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as e:  # DatasetNotFoundError, bad config names, unreadable metadata...
      raise UserError(f'data.source: TFDS dataset {name!r} not found in {data_dir} '
                      f'({_first_line(e)})') from None
    if not builder.is_prepared():
      raise UserError(f'data.source: TFDS dataset {name!r} is not prepared in {data_dir} (run: '
                      f'tfds build {name} --data_dir={data_dir} --file_format=array_record)')
    features = builder.info.features
    if text_field not in features.keys():
      raise UserError(f'data.text_field: TFDS dataset {name!r} has no feature {text_field!r} '
                      f'(it has {sorted(features.keys())})')
    splits = set(builder.info.splits.keys())
    if 'train' not in splits:
      raise UserError(f'data.source: TFDS dataset {name!r} has no train split '
                      f'(it has {sorted(splits)})')
    self._split_names = {'train': 'train'}
    self._carve = False
    for candidate in ('validation', 'test'):
      if candidate in splits:
        self._split_names['validation'] = candidate
        break
    else:
      self._carve = True
      self._split_names['validation'] = 'train'
    try:
      self._sources = {s: builder.as_data_source(n) for s, n in self._split_names.items()}
    except Exception as e:  # TFRecord-only datasets have no random-access source
      raise UserError(f'data.source: TFDS dataset {name!r} has no ArrayRecord files '
                      f'({_first_line(e)}); rebuild it with --file_format=array_record') from None
    self._builder = builder
    self._text_field = text_field
    self._max_docs = max_docs
    self._fraction = validation_fraction
    safe = ''.join(c if c.isalnum() or c in '._-' else '_' for c in name)
    fingerprint = hashlib.sha256(repr((
        str(builder.data_dir), {s: builder.info.splits[s].num_examples for s in splits},
        text_field, max_docs, validation_fraction)).encode())
    self.key = f'tfds-{safe}-{fingerprint.hexdigest()[:12]}'
    self.description = f'TFDS {name} in {builder.data_dir}'


  def documents(self, split: str) -> Iterator[Document]:
    source = self._sources[split]
    count = 0
    for i in range(len(source)):
      if self._max_docs and count >= self._max_docs:
        return
      if self._carve and (unit_hash(str(i)) < self._fraction) != (split == 'validation'):
        continue
      value = source[i][self._text_field]
      if isinstance(value, bytes):
        text, replaced = decode_utf8(value)
      else:
        text, replaced = _clean_str(str(value))
      if text.strip():
        count += 1
        yield Document(text, replaced)


def _first_line(exc: BaseException) -> str:
  text = str(exc).strip()
  return text.splitlines()[0] if text else type(exc).__name__


def open_corpus(source: str, *, data_dir: str, text_field: str, max_docs: int,
                validation_fraction: float):
  """The corpus that `data.source` names (see the module docstring)."""
  if source == 'default':
    return StdlibCorpus(data_dir, max_docs, validation_fraction)
  if source.startswith('tfds:'):
    return TfdsCorpus(source[len('tfds:'):], data_dir, text_field, max_docs, validation_fraction)
  return LocalCorpus(source, text_field, max_docs, validation_fraction)
