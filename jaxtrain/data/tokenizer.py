"""Tokenizers behind one small interface: byte-level BPE trained here, HF tokenizer.json, sentencepiece.

Bits per byte needs, for every token, the number of UTF-8 bytes of text it stands for, so that a
packed row (which may start or end inside a document) can report the bytes its targets cover.

* Byte-level BPE (ours, GPT-2/LLaMA-3 style tokenizer.json files): every vocab character is one
  byte, so a table lookup by id is exact; a document whose counts do not add up to its size (an
  unusual added token, say) falls back to offsets.
* Everything else uses the tokenizer's own offsets: token i is charged the bytes between the end
  of token i-1 and its own end. Text no token covers (whitespace a sentencepiece normalizer
  dropped, the tail after the last token) goes to the next or the last token, and a character
  split across several byte tokens is charged to one of them.

Either way the counts of a document add up to its exact UTF-8 size.
"""

from __future__ import annotations

import abc
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence

import numpy as np

from jaxtrain.errors import UserError

# The one special token of the BPE tokenizer trained here; it separates documents in packed rows.
EOS_TOKEN = '<|endoftext|>'
# Byte-level BPE starts from the 256 byte symbols and needs the end-of-text token on top.
MIN_BPE_VOCAB = 257
# Names that HF tokenizer.json files use for end/begin of text, tried in order when no
# tokenizer_config.json sits next to the file.
_EOS_CANDIDATES = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>', '<|eot_id|>', '[SEP]')
_BOS_CANDIDATES = ('<|begin_of_text|>', '<s>', '<bos>', '[CLS]')


def byte_counts(ends: np.ndarray, num_bytes: int) -> np.ndarray:
  """Bytes charged to each token, given the byte offset where each token ends.

  Offsets need not be monotone (special or merged tokens can report (0, 0)), so each token is
  charged only what lies past every earlier end; the remainder after the last end goes to the last
  token. The result sums to `num_bytes` exactly.
  """
  if len(ends) == 0:
    return np.zeros(0, np.int32)
  ends = np.maximum.accumulate(np.minimum(ends.astype(np.int64), num_bytes))
  counts = np.diff(ends, prepend=0)
  counts[-1] += num_bytes - ends[-1]
  return counts.astype(np.int32)


def _char_to_byte_offsets(text: str, char_offsets: np.ndarray) -> np.ndarray:
  """Maps code-point offsets (what HF tokenizers report) to UTF-8 byte offsets."""
  if text.isascii():
    return char_offsets
  code_points = np.frombuffer(text.encode('utf-32-le'), dtype='<u4')
  widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
  positions = np.concatenate([[0], np.cumsum(widths)])
  return positions[char_offsets]


def _byte_level_table(tokenizer) -> np.ndarray | None:
  """Bytes of text behind each id of a byte-level BPE (one vocab character = one byte), else None.

  A lookup by id spares the tokenizer computing offsets and us converting them, which otherwise
  takes longer than the encoding itself.
  """
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top

  spec = json.loads(tokenizer.to_str())

  def has_byte_level(component):
    if not component:
      return False
    if component.get('type') == 'ByteLevel':
      return True
    parts = component.get('pretokenizers') or component.get('decoders') or []
    return any(has_byte_level(p) for p in parts)

  if (spec.get('normalizer') is not None or spec.get('model', {}).get('type') != 'BPE'
      or not has_byte_level(spec.get('pre_tokenizer')) or not has_byte_level(spec.get('decoder'))):
    return None
  alphabet = set(''.join(pre_tokenizers.ByteLevel.alphabet()))
  table = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), np.int32)
  for token, i in tokenizer.get_vocab(with_added_tokens=False).items():
    if not set(token) <= alphabet:
      return None
    table[i] = len(token)
  for i, added in tokenizer.get_added_tokens_decoder().items():
    table[i] = 0 if added.special else len(added.content.encode('utf-8'))
  return table


class Tokenizer(abc.ABC):
  """What the data pipeline, evaluation and generation need from a tokenizer.

  `encode` adds no special tokens: the pipeline appends `eos_id` after each document itself.
  """

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids, special tokens included; every id is below it."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """Id that ends a document; packed rows use it as the separator."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int | None:
    """Id that starts a document, or None when the tokenizer has none."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens are kept so that nothing is silently hidden."""

  @property
  def byte_table(self) -> np.ndarray | None:
    """UTF-8 bytes behind each id where the vocabulary alone determines them (byte-level BPE),
    else None. Prepared token files store bytes per token only where this table is wrong."""
    return None

  @abc.abstractmethod
  def encode_with_bytes(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each text, (ids, bytes per token) as int32 arrays; see the module docstring."""

  @abc.abstractmethod
  def save(self, directory: str | os.PathLike) -> pathlib.Path:
    """Writes the tokenizer into `directory` so that `load(directory)` returns an equal one."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of several texts; implementations batch the work in native code."""
    return [ids.tolist() for ids, _ in self.encode_with_bytes(texts)]

  @staticmethod
  def load(path: str | os.PathLike) -> Tokenizer:
    """See `load`."""
    return load(path)


class HFTokenizer(Tokenizer):
  """A HuggingFace `tokenizers` tokenizer (tokenizer.json), including the BPE trained here.

  Text that happens to contain a special token's string (say '<|endoftext|>') is encoded as plain
  text, never as the special id: a document must not invent its own separators. Only documents
  that contain such a string pay for this, since the `tokenizers` option for it is slower.
  """

  def __init__(self, tokenizer, eos_token: str, bos_token: str | None = None):
    self._tok = tokenizer
    self._eos_token = eos_token
    self._bos_token = bos_token
    self._eos_id = tokenizer.token_to_id(eos_token)
    self._bos_id = tokenizer.token_to_id(bos_token) if bos_token is not None else None
    if self._eos_id is None:
      raise ValueError(f'tokenizer has no end-of-text token {eos_token!r}')
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    self._specials = (re.compile('|'.join(re.escape(t) for t in specials)) if specials else None)
    self._byte_table = _byte_level_table(tokenizer)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def byte_table(self) -> np.ndarray | None:
    return self._byte_table

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._encodings(texts, offsets=False)]

  def _encodings(self, texts: Sequence[str], *, offsets: bool):
    """HF Encodings of `texts`, special-token strings encoded as text."""
    texts = list(texts)
    plain = [i for i, t in enumerate(texts) if self._specials is None or
             not self._specials.search(t)]
    tricky = sorted(set(range(len(texts))) - set(plain))
    # encode_batch_fast skips the offsets (tokenizers >= 0.20.2); it is what most text needs.
    fast = getattr(self._tok, 'encode_batch_fast', None)
    encode = self._tok.encode_batch if offsets or fast is None else fast
    out = [None] * len(texts)
    for i, enc in zip(plain, encode([texts[i] for i in plain], add_special_tokens=False)):
      out[i] = enc
    if tricky:
      self._tok.encode_special_tokens = True
      try:
        encs = self._tok.encode_batch([texts[i] for i in tricky], add_special_tokens=False)
      finally:
        self._tok.encode_special_tokens = False
      for i, enc in zip(tricky, encs):
        out[i] = enc
    return out

  def encode_with_bytes(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    texts = list(texts)
    sizes = [len(t.encode('utf-8')) for t in texts]
    out = [None] * len(texts)
    redo = []
    table = self._byte_table
    for i, enc in enumerate(self._encodings(texts, offsets=table is None)):
      ids = np.asarray(enc.ids, dtype=np.int32)
      if table is not None:
        counts = table[ids]
        # Byte-level BPE is lossless, so the table must add up; if something (an added token,
        # a normalizer) breaks that, the offsets still give exact sizes.
        if int(counts.sum()) == sizes[i]:
          out[i] = (ids, counts)
        else:
          redo.append(i)
      else:
        out[i] = (ids, self._counts_from_offsets(texts[i], sizes[i], enc))
    if redo:
      for i, enc in zip(redo, self._encodings([texts[i] for i in redo], offsets=True)):
        out[i] = (np.asarray(enc.ids, dtype=np.int32),
                  self._counts_from_offsets(texts[i], sizes[i], enc))
    return out

  @staticmethod
  def _counts_from_offsets(text: str, num_bytes: int, enc) -> np.ndarray:
    if not enc.ids:
      return np.zeros(0, np.int32)
    ends = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
    return byte_counts(_char_to_byte_offsets(text, ends), num_bytes)

  def save(self, directory: str | os.PathLike) -> pathlib.Path:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / 'tokenizer.json'
    self._tok.save(str(path))
    # The same file HF uses, so that the directory also loads with transformers.
    config = {'eos_token': self._eos_token, 'bos_token': self._bos_token}
    if self._bos_token is None:  # so that loading it back finds no bos either
      config['add_bos_token'] = False
    (directory / 'tokenizer_config.json').write_text(json.dumps(config, indent=2) + '\n')
    return path

  def model(self):
    """The tokenizer.json's model: vocabulary and merges (what decides the ids)."""
    return json.loads(self._tok.to_str())['model']

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
    """Loads tokenizer.json; special tokens come from a tokenizer_config.json beside it if any."""
    import tokenizers  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path)
    try:
      tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises bare Exceptions
      raise UserError(f'{path}: not a HuggingFace tokenizer.json ({_first_line(e)})') from None
    eos, bos, add_bos = _special_tokens_from_config(path.parent / 'tokenizer_config.json')
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    if eos is None:
      eos = next((t for t in _EOS_CANDIDATES if t in added), None)
    if bos is None:
      bos = next((t for t in _BOS_CANDIDATES if t in added), None)
    if not add_bos:  # add_bos_token: false (GPT-2-style configs): as in transformers, prompts
      bos = None     # start without the bos_token the config names
    if eos is None or tok.token_to_id(eos) is None:
      raise UserError(f'{path}: no end-of-text token found (add a tokenizer_config.json with '
                      'eos_token next to it)')
    if bos is not None and tok.token_to_id(bos) is None:
      bos = None
    # A tokenizer.json may carry truncation or padding settings (for a model's fixed input):
    # documents must be tokenized whole, never cut or padded.
    tok.no_truncation()
    tok.no_padding()
    return cls(tok, eos, bos)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (.model file), e.g. LLaMA-2's tokenizer."""

  def __init__(self, model_proto: bytes, path: str = '<memory>'):
    import sentencepiece  # pylint: disable=g-import-not-at-top

    self._proto = model_proto
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except Exception as e:  # sentencepiece raises RuntimeError or OSError depending on version
      raise UserError(f'{path}: not a sentencepiece model ({_first_line(e)})') from None
    if self._sp.eos_id() < 0:
      raise UserError(f'{path}: the sentencepiece model has no end-of-text (eos) piece')

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int | None:
    bos = self._sp.bos_id()
    return bos if bos >= 0 else None

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def encode_with_bytes(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for text, (ids, ends) in zip(texts, self._encode_with_byte_ends(texts)):
      ids = np.asarray(ids, dtype=np.int32)
      out.append((ids, byte_counts(np.asarray(ends, np.int64), len(text.encode('utf-8')))))
    return out

  def _encode_with_byte_ends(self, texts):
    """(ids, byte end offsets) per text, through whichever offset API this version has."""
    try:  # sentencepiece >= 0.2.1: byte offsets for a whole batch in native code
      results = self._sp.encode(list(texts), return_type='offset_mapping', return_bytes=True,
                                num_threads=os.cpu_count() or 1)
      return [(r['ids'], [end for _, end in r['offsets']]) for r in results]
    except (TypeError, ValueError):  # 0.2.0: per-piece protos with byte begin/end
      protos = [self._sp.encode_as_immutable_proto(t) for t in texts]
      return [([p.id for p in pr.pieces], [p.end for p in pr.pieces]) for pr in protos]

  def save(self, directory: str | os.PathLike) -> pathlib.Path:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / 'tokenizer.model'
    path.write_bytes(self._proto)
    return path

  def model(self):
    """The sentencepiece model proto (what decides the ids)."""
    return self._proto

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
    path = pathlib.Path(path)
    return cls(path.read_bytes(), str(path))


def train_bpe(texts: Iterable[str], vocab_size: int, *, length: int | None = None) -> HFTokenizer:
  """Trains a byte-level BPE tokenizer (GPT-2 style pre-tokenization) with `vocab_size` ids.

  Byte-level means every string encodes losslessly (no unknown token), which bits per byte relies
  on. A corpus too small to learn enough merges yields fewer ids than `vocab_size`; that is fine
  since every id is still below it. The trainer is deterministic, so every host that prepares the
  same corpus gets the same tokenizer.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  if vocab_size < MIN_BPE_VOCAB:
    raise UserError(f'vocab_size={vocab_size} is too small for data.tokenizer=bpe '
                    f'(byte-level BPE needs at least {MIN_BPE_VOCAB})')
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[EOS_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer, length=length)
  return HFTokenizer(tok, EOS_TOKEN)


def saved_file(directory: str | os.PathLike) -> pathlib.Path | None:
  """The tokenizer file `Tokenizer.save` wrote into `directory` (tokenizer.json or .model)."""
  for name in ('tokenizer.json', 'tokenizer.model'):
    if (pathlib.Path(directory) / name).is_file():
      return pathlib.Path(directory) / name
  return None


def same_as_saved(tokenizer: Tokenizer, directory: str | os.PathLike) -> bool:
  """Whether `tokenizer` maps text to the ids the one saved in `directory` does: the same model
  (vocabulary and merges, or sentencepiece proto) and end/begin-of-text ids. Files are not
  compared byte for byte: a tokenizer copied from HF carries settings that do not change ids."""
  saved = load(directory)
  return (type(saved) is type(tokenizer) and saved.eos_id == tokenizer.eos_id
          and saved.bos_id == tokenizer.bos_id and saved.model() == tokenizer.model())


def load(path: str | os.PathLike) -> Tokenizer:
  """Loads a tokenizer from a tokenizer.json, a sentencepiece .model, or a directory holding one.

  Raises UserError naming the path when there is nothing loadable there.
  """
  path = pathlib.Path(os.path.expanduser(os.fspath(path)))
  if path.is_dir():
    found = saved_file(path)
    if found is None:
      raise UserError(f'{path}: directory holds no tokenizer.json or tokenizer.model')
    return load(found)
  if not path.is_file():
    raise UserError(f'{path}: no such tokenizer file')
  if path.suffix == '.model':
    return SentencePieceTokenizer.from_file(path)
  if path.suffix == '.json':
    return HFTokenizer.from_file(path)
  raise UserError(f'{path}: unknown tokenizer format (expected a .json or .model file)')


def _special_tokens_from_config(path: pathlib.Path) -> tuple[str | None, str | None, bool]:
  """eos/bos token strings from an HF tokenizer_config.json, where present and readable, and
  whether a bos is to be prepended (`add_bos_token`, true unless it says false)."""
  if not path.is_file():
    return None, None, True
  try:
    config = json.loads(path.read_text())
  except (OSError, ValueError):
    return None, None, True
  if not isinstance(config, dict):
    return None, None, True

  def content(value):
    # HF writes either a plain string or an AddedToken dict with the string in 'content'.
    if isinstance(value, dict):
      value = value.get('content')
    return value if isinstance(value, str) else None

  return (content(config.get('eos_token')), content(config.get('bos_token')),
          config.get('add_bos_token') is not False)


def _first_line(exc: BaseException) -> str:
  text = str(exc).strip()
  return text.splitlines()[0] if text else type(exc).__name__
