"""Streaming readers of local corpus files: .txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet.

Each reader yields `(name, Document)` one document at a time, so preparation holds one line (JSONL),
one row group (Parquet) or one file (.txt, a single document by definition) in memory, never a
whole corpus. Names are what the train/validation hash is taken of: the path relative to the
corpus root for a .txt file, `path:line` for JSONL (the line of the decompressed stream), and
`path:row` for Parquet (the row within the file), with no .gz/.zst suffix, so a document keeps its split when other files
are added or removed.

Every problem with the input is a `UserError` of one line naming the file (and line or row).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import pathlib
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from jaxtrain.errors import UserError

# A file is binary, not text with a few bad bytes, past this share of undecodable bytes.
MAX_INVALID_SHARE = 0.1
# The head of a text file that is checked for binary data before any line of it is parsed, so a
# binary file is reported as binary rather than as bad JSON on its first line.
_SNIFF_BYTES = 1 << 16
_JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst')


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


def clean_str(text: str) -> tuple[str, int]:
  """Replaces lone surrogates (JSON can encode them) so that the text has a UTF-8 form."""
  try:
    text.encode('utf-8')
    return text, 0
  except UnicodeEncodeError:
    return decode_utf8(text.encode('utf-8', errors='surrogatepass'))


def is_jsonl(path: pathlib.Path) -> bool:
  return path.name.endswith(_JSONL_SUFFIXES)


def _is_binary(data: bytes) -> bool:
  return b'\x00' in data or decode_utf8(data)[1] > MAX_INVALID_SHARE * len(data)


def _open_stream(path: pathlib.Path):
  """A binary file object of the decompressed contents."""
  try:
    if path.name.endswith('.gz'):
      return gzip.open(path, 'rb')
    if path.name.endswith('.zst'):
      import zstandard  # pylint: disable=g-import-not-at-top
      raw = open(path, 'rb')  # pylint: disable=consider-using-with
      return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, 'rb')  # pylint: disable=consider-using-with
  except OSError as e:
    raise UserError(f'{path}: cannot read ({e.strerror})') from None


def _decompression_error(path: pathlib.Path, e: Exception) -> UserError:
  kind = 'gzip' if path.name.endswith('.gz') else 'zstd' if path.name.endswith('.zst') else 'file'
  detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return UserError(f'{path}: corrupt or truncated {kind} data ({detail})')


def _lines(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, raw line) of a possibly compressed file, checked for binary data."""
  errors: tuple[type[Exception], ...] = (EOFError, gzip.BadGzipFile, zlib.error)
  if path.name.endswith('.zst'):
    import zstandard  # pylint: disable=g-import-not-at-top
    errors += (zstandard.ZstdError,)
  any_text = False
  with _open_stream(path) as f:
    try:
      head = f.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
      if _is_binary(head):
        raise UserError(f'{path}: not UTF-8 text (binary data?)')
      line_no = 0
      for line_no, raw in enumerate(f, 1):
        if b'\x00' in raw:
          raise UserError(f'{path}:{line_no}: not UTF-8 text (binary data?)')
        if not any_text and raw.strip():
          any_text = True
        yield line_no, raw.rstrip(b'\n')
    except errors as e:
      raise _decompression_error(path, e) from None
    except OSError as e:
      raise UserError(f'{path}: cannot read ({e.strerror or e})') from None
  if not any_text:
    raise UserError(f'{path}: empty file')


@dataclasses.dataclass(frozen=True)
class LocalFiles:
  """The files of a local corpus and how to read them; small and picklable (sent to workers)."""

  files: tuple[pathlib.Path, ...]
  root: pathlib.Path
  text_field: str

  def name(self, i: int) -> str:
    """File i's part of its documents' names: the path under the root, without .gz/.zst, so
    that compressing a file keeps every document in its split."""
    rel = self.files[i].relative_to(self.root).as_posix()
    return rel.removesuffix('.gz').removesuffix('.zst')

  def documents(self, i: int) -> Iterator[tuple[str, Document]]:
    """(name, document) of file i, streamed; raises UserError on the first problem found."""
    path = self.files[i]
    rel = self.name(i)
    if path.suffix == '.parquet':
      found = self._parquet(path, rel)
    elif is_jsonl(path):
      found = self._jsonl(path, rel)
    else:
      found = self._text(path, rel)
    empty = True
    for item in found:
      empty = False
      yield item
    if empty and (path.suffix == '.parquet' or is_jsonl(path)):
      what = 'row' if path.suffix == '.parquet' else 'line is blank or'
      raise UserError(f'{path}: no documents (every {what} has empty {self.text_field!r})')

  def _text(self, path: pathlib.Path, rel: str) -> Iterator[tuple[str, Document]]:
    if path.name.endswith(('.gz', '.zst')):
      data = b'\n'.join(raw for _, raw in _lines(path))
    else:
      try:
        data = path.read_bytes()
      except OSError as e:
        raise UserError(f'{path}: cannot read ({e.strerror})') from None
      if not data.strip():
        raise UserError(f'{path}: empty file')
      if _is_binary(data):
        raise UserError(f'{path}: not UTF-8 text (binary data?)')
    yield rel, Document(*decode_utf8(data))

  def _jsonl(self, path: pathlib.Path, rel: str) -> Iterator[tuple[str, Document]]:
    field = self.text_field
    invalid = total = 0
    for line_no, raw in _lines(path):
      if not raw.strip():
        continue
      line, replaced = decode_utf8(raw)
      invalid += replaced
      total += len(raw)
      if line_no == 1:
        line = line.removeprefix('\ufeff')  # a UTF-8 byte-order mark, as some editors write
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{path}:{line_no}: invalid JSON ({e.msg})') from None
      if not isinstance(obj, dict) or field not in obj:
        raise UserError(f'{path}:{line_no}: no {field!r} field (data.text_field)')
      text = obj[field]
      if not isinstance(text, str):
        raise UserError(f'{path}:{line_no}: field {field!r} is not a string')
      text, fixed = clean_str(text)
      if text.strip():
        yield f'{rel}:{line_no}', Document(text, replaced + fixed)
    if invalid > MAX_INVALID_SHARE * max(total, 1):
      raise UserError(f'{path}: not UTF-8 text (binary data?)')

  def _parquet(self, path: pathlib.Path, rel: str) -> Iterator[tuple[str, Document]]:
    """One row group at a time: the unit Parquet writers (HF datasets, FineWeb) size for reading."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    field = self.text_field
    try:
      pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
      raise UserError(f'{path}: not a readable Parquet file ({_first_line(e)})') from None
    if field not in pf.schema_arrow.names:
      raise UserError(f'{path}: no column {field!r} (data.text_field; it has '
                      f'{pf.schema_arrow.names})')
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
      raise UserError(f'{path}: column {field!r} is {kind}, not a string')
    row = 0
    for group in range(pf.num_row_groups):
      try:
        column = pf.read_row_group(group, columns=[field]).column(0)
      except (pa.ArrowException, OSError) as e:
        raise UserError(f'{path}: row group {group} is unreadable ({_first_line(e)})') from None
      for text in column.to_pylist():
        if text is not None:
          text, fixed = clean_str(text)
          if text.strip():
            yield f'{rel}:{row}', Document(text, fixed)
        row += 1


def _first_line(exc: BaseException) -> str:
  text = str(exc).strip()
  return text.splitlines()[0] if text else type(exc).__name__
