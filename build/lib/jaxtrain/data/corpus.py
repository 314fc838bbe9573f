"""Text corpora: where documents come from, how they are checked, and how they split.

Three kinds of `data.source`, one interface (`key`, `documents(split)`):

* `default`: the running interpreter's own standard library `.py` files, registered as the TFDS
  dataset `jaxtrain_stdlib` and written once as ArrayRecord, so training works with no download.
* a path, directory or glob of local `.txt` (one document per file) or `.jsonl` (one per line)
  files, read directly: they already are on disk, so a second text copy would only cost space.
* `tfds:NAME`, any TFDS dataset already prepared as ArrayRecord in `data.data_dir`, read with
  `builder.as_data_source` (TensorFlow-free).

Splits are chosen per document by a hash of its name (relative path, `path:line` for JSONL), so a
document keeps its split when others are added or removed; a corpus of one document is cut by lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
import platform
import sysconfig
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds  # only tf.data needs TensorFlow, and we never use it

from jaxtrain.data.config import resolve_local_files
from jaxtrain.errors import UserError

SPLITS = ('train', 'validation')
# Directory names whose .py files are test code, not library code.
_STDLIB_SKIP_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', 'dist-packages',
                               '__pycache__'})
# A file is binary, not text with a few bad bytes, past this share of undecodable bytes.
_MAX_INVALID_SHARE = 0.1


class Document(NamedTuple):
  text: str
  # Number of U+FFFD characters that stand for undecodable bytes of the original file.
  replaced: int


def decode_utf8(data: bytes) -> tuple[str, int]:
  """Decodes UTF-8, replacing each undecodable sequence with U+FFFD and counting them."""
  try:
    return data.decode('utf-8'), 0
  except UnicodeDecodeError:
    text = data.decode('utf-8', errors='replace')
    # U+FFFD already present in the input (EF BF BD) is text, not a replacement.
    return text, text.count('\ufffd') - data.count(b'\xef\xbf\xbd')


def _clean_str(text: str) -> tuple[str, int]:
  """Replaces lone surrogates (JSON can encode them) so that the text has a UTF-8 form."""
  try:
    text.encode('utf-8')
    return text, 0
  except UnicodeEncodeError:
    return decode_utf8(text.encode('utf-8', errors='surrogatepass'))


def _read_bytes(path: pathlib.Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise UserError(f'{path}: cannot read ({e.strerror})') from None


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


class StdlibCorpus:
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


@dataclasses.dataclass(frozen=True)
class _DocRef:
  file: int
  line: int  # 1-based line of a JSONL document; 0 for a whole .txt file
  name: str


class LocalCorpus:
  """Documents from local files, all checked before the first one is handed out.

  `.jsonl` files hold one JSON object per line with the text under `data.text_field` (blank lines
  are skipped, so are objects whose text is empty); any other file is one document of plain
  text. Invalid UTF-8 inside text becomes U+FFFD and is counted; a file with NUL bytes or more than
  10% undecodable bytes is binary and rejected, as is an empty file.
  """

  def __init__(self, source: str, text_field: str, max_docs: int, validation_fraction: float):
    self._files = resolve_local_files(source)
    self._text_field = text_field
    self._fraction = validation_fraction
    self._root = pathlib.Path(os.path.commonpath([p.parent for p in self._files]))
    fingerprint = hashlib.sha256()
    for p in self._files:
      st = p.stat()
      fingerprint.update(f'{p}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    fingerprint.update(f'{text_field}\0{max_docs}\0{validation_fraction!r}'.encode())
    # The key comes from names, sizes and times alone, so a prepared corpus is found again
    # without reading any file; reading and checking waits until documents are asked for.
    self.key = f'local-{fingerprint.hexdigest()[:16]}'
    self.description = f'{len(self._files)} local file(s) under {self._root}'
    self._max_docs = max_docs
    self._refs = None
    self._single = False

  def _split_refs(self) -> dict[str, list[_DocRef]]:
    if self._refs is None:
      refs = self._scan()
      if self._max_docs:
        refs = refs[:self._max_docs]
      self._single = len(refs) == 1
      is_val = choose_validation([r.name for r in refs], self._fraction)
      self._refs = {'train': [r for r, v in zip(refs, is_val) if not v],
                    'validation': [r for r, v in zip(refs, is_val) if v]}
    return self._refs

  def _scan(self) -> list[_DocRef]:
    refs = []
    for i, path in enumerate(self._files):
      rel = path.relative_to(self._root).as_posix()
      if path.suffix == '.jsonl':
        found = [_DocRef(i, line, f'{rel}:{line}') for line, _ in self._jsonl_documents(path)]
        if not found:
          raise UserError(f'{path}: no documents (every line is blank or has empty '
                          f'{self._text_field!r})')
        refs.extend(found)
      else:
        self._text_document(path)
        refs.append(_DocRef(i, 0, rel))
    return refs

  def _checked_bytes(self, path: pathlib.Path) -> bytes:
    """The file's bytes, once it is known to be neither empty nor binary."""
    data = _read_bytes(path)
    if not data.strip():
      raise UserError(f'{path}: empty file')
    if b'\x00' in data or decode_utf8(data)[1] > _MAX_INVALID_SHARE * len(data):
      raise UserError(f'{path}: not UTF-8 text (binary data?)')
    return data

  def _text_document(self, path: pathlib.Path) -> Document:
    return Document(*decode_utf8(self._checked_bytes(path)))

  def _jsonl_documents(self, path: pathlib.Path) -> Iterator[tuple[int, Document]]:
    field = self._text_field
    for line_no, raw in enumerate(self._checked_bytes(path).split(b'\n'), 1):
      if not raw.strip():
        continue
      line, replaced = decode_utf8(raw)
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{path}:{line_no}: invalid JSON ({e.msg})') from None
      if not isinstance(obj, dict) or field not in obj:
        raise UserError(f'{path}:{line_no}: no {field!r} field (data.text_field)')
      text = obj[field]
      if not isinstance(text, str):
        raise UserError(f'{path}:{line_no}: field {field!r} is not a string')
      text, fixed = _clean_str(text)
      if text.strip():
        yield line_no, Document(text, replaced + fixed)

  def documents(self, split: str) -> Iterator[Document]:
    refs = self._split_refs()
    if self._single:
      ref = (refs['train'] + refs['validation'])[0]
      doc = next(self._read([ref]))
      part = split_single(doc.text, self._fraction, ref.name)[split]
      yield Document(part, doc.replaced if split == 'train' else 0)
      return
    yield from self._read(refs[split])

  def _read(self, refs: Sequence[_DocRef]) -> Iterator[Document]:
    by_file: dict[int, set[int]] = {}
    for r in refs:
      by_file.setdefault(r.file, set()).add(r.line)
    for i in sorted(by_file):
      path = self._files[i]
      if path.suffix == '.jsonl':
        wanted = by_file[i]
        for line, doc in self._jsonl_documents(path):
          if line in wanted:
            yield doc
      else:
        yield self._text_document(path)


# ---------------------------------------------------------------------------------------------
# Any TFDS dataset already prepared as ArrayRecord.


class TfdsCorpus:
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
