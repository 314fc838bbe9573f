"""The `data.*` config section: defaults and the cheap checks that run before anything is prepared."""

from __future__ import annotations

import glob
import os
import pathlib

import ml_collections

from jaxtrain.errors import UserError

DEFAULT_DATA_DIR = '~/.cache/jaxtrain/data'
# Files a directory given as data.source contributes; a glob can pick any other text files.
LOCAL_SUFFIXES = ('.txt', '.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet')


def default_config() -> ml_collections.ConfigDict:
  """Defaults for `data.*`: the embedded stdlib corpus and a BPE tokenizer trained on it."""
  cfg = ml_collections.ConfigDict()
  # 'default' (Python stdlib), a path / directory / glob of .txt, .jsonl(.gz/.zst) or .parquet
  # files, or 'tfds:NAME'; several of these separated by commas make a mixture (see weights).
  cfg.source = 'default'
  # Mixture weights, one per source, comma-separated ('0.7,0.3'); '' = equal weights. Batches draw
  # rows (tokens) from the sources in these proportions.
  cfg.weights = ''
  # 'bpe' (byte-level BPE trained on the train split, model.vocab_size tokens), or a tokenizer.json
  # or sentencepiece .model (or a directory holding one).
  cfg.tokenizer = 'bpe'
  cfg.seq_len = 256  # Tokens per training sequence (documents are packed).
  # Prepared datasets, tokenizers and token files, shared by every run on this machine
  # (default: $JAXTRAIN_DATA_DIR if set).
  cfg.data_dir = os.environ.get('JAXTRAIN_DATA_DIR', DEFAULT_DATA_DIR)
  # JSONL key (and TFDS feature) that holds a document's text.
  cfg.text_field = 'text'
  cfg.shuffle_seed = 0  # Seed of the training data order (combined with train.seed).
  # Use only the first N documents (0 = all): small corpora for tests and quick runs.
  cfg.max_docs = 0
  # Share of documents (chosen by a hash of their name) held out for validation.
  cfg.validation_fraction = 0.02
  # Grain worker processes for the training pipeline; 0 reads in the training process, which is
  # plenty since tokens are prepared ahead of time.
  cfg.worker_count = 0
  # Processes that tokenize local files at preparation (0 = one per CPU core); a file is the unit.
  cfg.prepare_workers = 0
  # A prepared shard (one ArrayRecord file) is closed past this many MB of stored tokens.
  cfg.shard_mb = 256
  return cfg


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate_config(data_cfg) -> None:
  """Raises UserError naming `data.<key>` for a bad value. Touches no data beyond `os.path` checks."""
  known = set(default_config().keys())
  for key in data_cfg.keys():
    if key not in known:
      raise UserError(f'data.{key}: unknown key (known: {", ".join(sorted(known))})')
  get = lambda key: data_cfg.get(key, default_config()[key])  # pylint: disable=unnecessary-lambda-assignment

  source = get('source')
  if not isinstance(source, str) or not source.strip():
    raise UserError("data.source: must be 'default', a path or glob of .txt/.jsonl/.parquet "
                    "files, or 'tfds:NAME'")
  sources = split_sources(source)
  for one in sources:
    if one.startswith('tfds:') and not one[len('tfds:'):].strip():
      raise UserError('data.source: tfds: needs a dataset name, e.g. tfds:tiny_shakespeare')
    if one != 'default' and not one.startswith('tfds:'):
      resolve_local_files(one)
  mixture_weights(get('weights'), len(sources))

  tokenizer = get('tokenizer')
  if not isinstance(tokenizer, str) or not tokenizer.strip():
    raise UserError("data.tokenizer: must be 'bpe' or a path to tokenizer.json or a .model file")
  if tokenizer != 'bpe':
    path = os.path.expanduser(tokenizer)
    if not os.path.exists(path):
      raise UserError(f'data.tokenizer: no such file: {tokenizer}')
    if os.path.isfile(path) and not path.endswith(('.json', '.model')):
      raise UserError(f'data.tokenizer: {tokenizer} is neither a tokenizer.json nor a '
                      'sentencepiece .model')

  for key, lowest in (('seq_len', 1), ('shuffle_seed', 0), ('max_docs', 0), ('worker_count', 0),
                      ('prepare_workers', 0), ('shard_mb', 1)):
    value = get(key)
    if not _is_int(value) or value < lowest:
      raise UserError(f'data.{key}: must be an integer >= {lowest}, got {value!r}')

  fraction = get('validation_fraction')
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
    raise UserError(f'data.validation_fraction: must be between 0 and 1, got {fraction!r}')

  for key in ('data_dir', 'text_field'):
    value = get(key)
    if not isinstance(value, str) or not value.strip():
      raise UserError(f'data.{key}: must be a non-empty string, got {value!r}')


def split_sources(source: str) -> list[str]:
  """The sources of `data.source`: one, or several separated by commas (a mixture)."""
  parts = [p.strip() for p in source.split(',')]
  if any(not p for p in parts):
    raise UserError(f'data.source: empty entry in the comma-separated list {source!r}')
  if len(set(parts)) != len(parts):
    raise UserError(f'data.source: a source is listed twice in {source!r}')
  return parts


def mixture_weights(weights, count: int) -> list[float]:
  """`data.weights` as `count` probabilities summing to 1 ('' = equal)."""
  if not isinstance(weights, str):
    raise UserError(f"data.weights: must be a string like '0.7,0.3', got {weights!r}")
  if not weights.strip():
    return [1.0 / count] * count
  try:
    values = [float(w) for w in weights.split(',')]
  except ValueError:
    raise UserError(f'data.weights: not a comma-separated list of numbers: {weights!r}') from None
  if len(values) != count:
    raise UserError(f'data.weights: {len(values)} weight(s) for {count} source(s) in data.source')
  if any(not v > 0 or v == float('inf') for v in values):
    raise UserError(f'data.weights: every weight must be a positive number, got {weights!r}')
  total = sum(values)
  return [v / total for v in values]


def local_source_root(source: str) -> pathlib.Path:
  """The directory `data.source` names its files under: a glob's directories before the first
  wildcard, a directory itself, a file's parent. Documents are named by their path below it,
  so files added anywhere the source reaches leave every other document's name (and split) as
  it was; the deepest directory common to the files would move when a file lands higher up."""
  expanded = os.path.expanduser(source)
  if any(c in expanded for c in '*?['):
    parts = pathlib.Path(expanded).parts
    first = next(i for i, part in enumerate(parts) if any(c in part for c in '*?['))
    return pathlib.Path(*parts[:first]).absolute() if first else pathlib.Path.cwd()
  if os.path.isdir(expanded):
    return pathlib.Path(expanded).absolute()
  return pathlib.Path(expanded).absolute().parent


def resolve_local_files(source: str) -> list[pathlib.Path]:
  """The files `data.source` names: one file, a directory (its .txt/.jsonl files) or a glob."""
  expanded = os.path.expanduser(source)
  if any(c in expanded for c in '*?['):
    files = [pathlib.Path(p) for p in glob.glob(expanded, recursive=True)]
    files = [p for p in files if p.is_file()]
    if not files:
      raise UserError(f'data.source: no files match {source!r}')
  elif os.path.isdir(expanded):
    files = [p for p in pathlib.Path(expanded).rglob('*')
             if p.is_file() and p.name.endswith(LOCAL_SUFFIXES)]
    if not files:
      raise UserError(f'data.source: directory {source} holds no '
                      f'{", ".join(LOCAL_SUFFIXES)} files')
  elif os.path.isfile(expanded):
    files = [pathlib.Path(expanded)]
  else:
    raise UserError(f'data.source: no such file or directory: {source}')
  return sorted(p.absolute() for p in files)
