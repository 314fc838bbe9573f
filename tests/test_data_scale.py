"""Preparation at scale: compressed and Parquet inputs, parallel and resumable shards, mixtures."""

import gzip
import json
import pathlib
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import jaxtrain.data as data
from jaxtrain.data import corpus as corpus_lib
from jaxtrain.data import store
from jaxtrain.data import tokenizer as tokenizer_lib
from jaxtrain.errors import UserError

VOCAB = 320
_WORDS = ('alpha beta gamma delta def return import class self lambda yield café naïve 日本 '
          'über 😀 print value index token row batch').split()


def make_texts(n, seed=0):
  rng = random.Random(seed)
  return [f'doc {seed}.{i} ' + ' '.join(rng.choice(_WORDS) for _ in range(rng.randint(4, 40)))
          for i in range(n)]


def write_jsonl(path: pathlib.Path, texts, opener=open):
  path.parent.mkdir(parents=True, exist_ok=True)
  with opener(path, 'wt', encoding='utf-8') as f:
    for t in texts:
      f.write(json.dumps({'text': t, 'id': len(t)}) + '\n')
  return path


def write_zst(path: pathlib.Path, texts):
  lines = ''.join(json.dumps({'text': t}) + '\n' for t in texts).encode('utf-8')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(zstandard.ZstdCompressor().compress(lines))
  return path


def write_parquet(path: pathlib.Path, texts, row_group_size=7):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table({'text': texts, 'n': list(range(len(texts)))}), path,
                 row_group_size=row_group_size)
  return path


def config(tmp_path, source, **overrides):
  cfg = data.default_config()
  cfg.source = str(source)
  cfg.data_dir = str(tmp_path / 'data')
  cfg.seq_len = 16
  cfg.validation_fraction = 0.1
  cfg.prepare_workers = 1
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope='module')
def tokenizer_json(tmp_path_factory):
  """One BPE tokenizer file, so that corpora in different formats get comparable ids."""
  directory = tmp_path_factory.mktemp('tok')
  tokenizer_lib.train_bpe(make_texts(60, seed=9), VOCAB).save(directory)
  return str(directory / 'tokenizer.json')


def all_records(prepared):
  """{split: [token ids of each stored document, in record order]}."""
  out = {}
  for split in ('train', 'validation'):
    source = grain.sources.ArrayRecordDataSource(prepared.split_paths(split))
    out[split] = [tuple(prepared.decode_record(source[i])[0]) for i in range(len(source))]
  return out


def one_line(exc_info):
  message = str(exc_info.value)
  assert '\n' not in message
  return message


# --- input formats ------------------------------------------------------------------------------


def test_parquet_and_compressed_inputs_give_the_same_tokens_as_plain_jsonl(tmp_path,
                                                                          tokenizer_json):
  texts = make_texts(50)
  sources = {
      'jsonl': write_jsonl(tmp_path / 'a' / 'c.jsonl', texts),
      'gz': write_jsonl(tmp_path / 'b' / 'c.jsonl.gz', texts, opener=gzip.open),
      'zst': write_zst(tmp_path / 'z' / 'c.jsonl.zst', texts),
      'parquet': write_parquet(tmp_path / 'p' / 'c.parquet', texts),
  }
  documents, stats = {}, {}
  for kind, path in sources.items():
    cfg = config(tmp_path, path, tokenizer=tokenizer_json)
    stats[kind] = data.prepare(cfg, VOCAB)
    records = all_records(store.prepare(cfg, VOCAB))
    documents[kind] = Counter(records['train'] + records['validation'])
  assert documents['gz'] == documents['jsonl'] == documents['zst'] == documents['parquet']
  assert len(documents['jsonl']) == 50
  # The split goes by the document's name (path:line), which is the same for .jsonl(.gz/.zst).
  assert stats['gz'] == stats['jsonl'] == stats['zst']
  total = lambda s: sum(v['tokens'] for v in s.values())  # pylint: disable=unnecessary-lambda-assignment
  assert total(stats['parquet']) == total(stats['jsonl'])


def test_directories_and_globs_collect_every_shard_format(tmp_path, tokenizer_json):
  write_jsonl(tmp_path / 'mix' / 'a.jsonl', make_texts(10, 1))
  write_jsonl(tmp_path / 'mix' / 'sub' / 'b.jsonl.gz', make_texts(10, 2), opener=gzip.open)
  write_parquet(tmp_path / 'mix' / 'c.parquet', make_texts(10, 3))
  (tmp_path / 'mix' / 'notes.md').write_text('not part of the corpus')
  stats = data.prepare(config(tmp_path, tmp_path / 'mix', tokenizer=tokenizer_json), VOCAB)
  assert stats['train']['documents'] + stats['validation']['documents'] == 30
  glob_stats = data.prepare(config(tmp_path, f'{tmp_path}/mix/**/*.jsonl*',
                                   tokenizer=tokenizer_json), VOCAB)
  assert glob_stats['train']['documents'] + glob_stats['validation']['documents'] == 20


# --- hostile inputs -----------------------------------------------------------------------------


def test_corrupt_parquet_file_is_a_one_line_error_naming_it(tmp_path):
  bad = tmp_path / 'bad.parquet'
  bad.write_bytes(b'PAR1 this is not really parquet' * 10)
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, bad), VOCAB)
  assert str(bad) in one_line(e) and 'Parquet' in one_line(e)
  good = write_parquet(tmp_path / 't' / 'cut.parquet', make_texts(30))
  good.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, good), VOCAB)
  assert str(good) in one_line(e)


def test_parquet_without_the_text_column_names_file_and_key(tmp_path):
  path = tmp_path / 'x.parquet'
  pq.write_table(pa.table({'body': ['a', 'b']}), path)
  with pytest.raises(UserError, match=r'x\.parquet: no column .text. \(data\.text_field'):
    data.prepare(config(tmp_path, path), VOCAB)


def test_truncated_gzip_and_zstd_are_one_line_errors_naming_the_file(tmp_path):
  gz = write_jsonl(tmp_path / 'g' / 'c.jsonl.gz', make_texts(400), opener=gzip.open)
  gz.write_bytes(gz.read_bytes()[:-40])
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, gz), VOCAB)
  assert str(gz) in one_line(e) and 'truncated gzip' in one_line(e)
  zst = write_zst(tmp_path / 'z' / 'c.jsonl.zst', make_texts(400))
  zst.write_bytes(zst.read_bytes()[:-40])
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, zst), VOCAB)
  assert str(zst) in one_line(e) and 'zstd' in one_line(e)


def test_bad_lines_inside_compressed_jsonl_name_file_and_line(tmp_path):
  path = tmp_path / 'c.jsonl.gz'
  with gzip.open(path, 'wt') as f:
    f.write('{"text": "fine"}\n{"text": "also fine"}\n{"txt": "oops"}\n')
  with pytest.raises(UserError, match=r'c\.jsonl\.gz:3: no .text. field'):
    data.prepare(config(tmp_path, path), VOCAB)
  binary = tmp_path / 'b' / 'c.jsonl.gz'
  binary.parent.mkdir()
  with gzip.open(binary, 'wb') as f:
    f.write(bytes(range(256)) * 50)
  with pytest.raises(UserError, match='not UTF-8 text'):
    data.prepare(config(tmp_path, binary), VOCAB)


# --- parallel, resumable preparation ------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_unit_per_file(monkeypatch):
  """Preparation units of one file each (small files are grouped into 64 MB units otherwise),
  so that a few small files make several units to kill, resume and share out."""
  monkeypatch.setattr(corpus_lib, 'UNIT_BYTES', 1)


def shard_corpus(directory, files=6, docs=25):
  for i in range(files):
    write_jsonl(directory / f'part-{i:03d}.jsonl', make_texts(docs, seed=i))
  return directory


def test_killed_preparation_resumes_and_gives_the_same_shards(tmp_path, monkeypatch):
  corpus = shard_corpus(tmp_path / 'corpus')
  reference = store.prepare(config(tmp_path / 'ref', corpus, shard_mb=1), VOCAB)

  written = []
  real_write = store.write_unit

  def dies_after_three(*args, **kwargs):
    if len(written) == 3:
      raise KeyboardInterrupt  # what a kill looks like to the code that was running
    written.append(args[1])
    return real_write(*args, **kwargs)

  monkeypatch.setattr(store, 'write_unit', dies_after_three)
  cfg = config(tmp_path / 'run', corpus, shard_mb=1)
  with pytest.raises(KeyboardInterrupt):
    store.prepare(cfg, VOCAB)
  done = list((tmp_path / 'run' / 'data').glob('tokens-v*/*/*/units/*/done.json'))
  assert len(done) == 3
  assert not list((tmp_path / 'run' / 'data').glob('tokens-v*/*/*/stats.json'))

  redone = []
  monkeypatch.setattr(store, 'write_unit',
                      lambda *a, **k: (redone.append(a[1]), real_write(*a, **k))[1])
  resumed = store.prepare(cfg, VOCAB)
  assert sorted(redone) == [3, 4, 5]  # the three finished files were not tokenized again
  assert resumed.info['splits'] == reference.info['splits']
  assert resumed.info['shards'] == reference.info['shards']
  assert all_records(resumed) == all_records(reference)


def test_sigkilled_preparation_resumes_and_gives_the_same_shards(tmp_path):
  corpus = tmp_path / 'corpus'
  for i in range(8):
    write_jsonl(corpus / f'part-{i:03d}.jsonl', make_texts(1500, seed=i))
  reference = store.prepare(config(tmp_path / 'ref', corpus), VOCAB)
  cfg = config(tmp_path / 'run', corpus)
  script = ('import sys, json; sys.path.insert(0, %r); import ml_collections; '
            'from jaxtrain.data import corpus, store; corpus.UNIT_BYTES = 1; '
            'store.prepare(ml_collections.ConfigDict(json.loads(sys.argv[1])), %d)'
            % (str(pathlib.Path(__file__).parents[1]), VOCAB))
  proc = subprocess.Popen([sys.executable, '-c', script, json.dumps(cfg.to_dict())])
  data_dir = tmp_path / 'run' / 'data'
  deadline = time.monotonic() + 120
  while not list(data_dir.glob('tokens-v*/*/*/units/*/done.json')) and proc.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished_before = len(list(data_dir.glob('tokens-v*/*/*/units/*/done.json')))
  assert not list(data_dir.glob('tokens-v*/*/*/stats.json'))
  assert 1 <= finished_before < 8
  resumed = store.prepare(cfg, VOCAB)
  assert resumed.info['shards'] == reference.info['shards']
  assert all_records(resumed) == all_records(reference)
  assert not list(data_dir.glob('tokens-v*/*/*/units/.tmp-*'))  # the killed run's leftovers


def test_two_workers_and_two_hosts_give_the_same_shards_as_one(tmp_path):
  corpus = shard_corpus(tmp_path / 'corpus', files=4)
  one = store.prepare(config(tmp_path / 'one', corpus), VOCAB)
  two = store.prepare(config(tmp_path / 'two', corpus, prepare_workers=2), VOCAB)
  # Process 1 of 2 alone: starts with its own files, then does the rest nobody finished.
  host = store.prepare(config(tmp_path / 'host', corpus), VOCAB, process_index=1,
                       process_count=2)
  assert one.info == two.info == host.info
  assert all_records(one) == all_records(two) == all_records(host)


def test_shards_are_bounded_and_the_loader_reads_them_all(tmp_path, tokenizer_json,
                                                          monkeypatch):
  corpus = write_jsonl(tmp_path / 'big.jsonl', make_texts(600))
  cfg = config(tmp_path, corpus, tokenizer=tokenizer_json, shard_mb=1)
  monkeypatch.setattr(store, '_MB', 4000)  # shard_mb=1 now means 4,000 bytes
  prepared = store.prepare(cfg, VOCAB)
  paths = prepared.split_paths('train')
  # Stored ids are 2 bytes a token (uint16), so each shard holds about 2,000 tokens.
  assert len(paths) >= prepared.splits['train']['tokens'] * 2 // 4000
  # One epoch of packed rows holds every stored token exactly once (the tail row aside).
  stream = prepared.splits['train']['tokens'] + prepared.splits['train']['documents']
  rows = data.train_iterator(cfg, VOCAB, batch_size=1, seed=0, process_index=0, process_count=1)
  got = Counter()
  for _ in range(stream // 17):
    row = next(rows)
    got.update(row['inputs'][0].tolist())
    got[int(row['targets'][0, -1])] += 1
  want = Counter()
  for ids in all_records(prepared)['train']:
    want.update(int(i) for i in ids)
  eos = prepared.eos_id
  got.pop(eos, None)
  assert sum((want - got).values()) < 17 and not got - want


def test_compact_records_store_bytes_only_where_the_vocabulary_cannot(tmp_path):
  table = np.array([0, 1, 2, 3, 1], np.int32)
  ids = np.array([1, 2, 4], np.int32)
  exact = store.encode_record(ids, table[ids], 'uint16', table)
  assert len(exact) == 1 + 2 * 3
  np.testing.assert_array_equal(store.decode_record(exact, 'uint16', table), [ids, table[ids]])
  odd = np.array([1, 5, 0], np.int32)
  carried = store.encode_record(ids, odd, 'uint16', table)
  assert len(carried) == 1 + 6 * 3
  np.testing.assert_array_equal(store.decode_record(carried, 'uint16', table), [ids, odd])
  big = np.array([70000, 3], np.int32)
  np.testing.assert_array_equal(
      store.decode_record(store.encode_record(big, odd[:2], 'int32', None), 'int32', None),
      [big, odd[:2]])
  # A prepared BPE corpus: uint16 ids, and byte-level BPE needs no stored bytes.
  cfg = config(tmp_path, write_jsonl(tmp_path / 'c.jsonl', make_texts(40)))
  prepared = store.prepare(cfg, VOCAB)
  assert prepared.info['id_dtype'] == 'uint16'
  source = grain.sources.ArrayRecordDataSource(prepared.split_paths('train'))
  assert all(source[i][0] == 0 for i in range(len(source)))
  assert sum(int(prepared.decode_record(source[i])[1].sum()) for i in range(len(source))) == \
      prepared.splits['train']['bytes']


def test_tiny_corpus_still_gets_a_validation_document(tmp_path, tokenizer_json):
  corpus = write_jsonl(tmp_path / 'c.jsonl', make_texts(3))
  stats = data.prepare(config(tmp_path, corpus, tokenizer=tokenizer_json,
                              validation_fraction=1e-9), VOCAB)
  assert stats['validation']['documents'] == 1 and stats['train']['documents'] == 2


# --- mixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def mixture_cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp('mix')
  a = write_jsonl(root / 'a.jsonl', make_texts(120, seed=1))
  b = write_parquet(root / 'b.parquet', make_texts(40, seed=2))
  return config(root, f'{a},{b}', weights='0.7,0.3')


def test_mixture_token_shares_match_the_weights(mixture_cfg):
  stats = data.prepare(mixture_cfg, VOCAB)
  assert [s['weight'] for s in stats['sources']] == pytest.approx([0.7, 0.3])
  it = data.train_iterator(mixture_cfg, VOCAB, batch_size=8, seed=0, process_index=0,
                           process_count=1, keep_source=True)
  # One epoch of the larger source's share: about as many rows as it has tokens / 0.7.
  rows = int(stats['sources'][0]['train']['tokens'] / 0.7 / 16)
  counts = Counter()
  for _ in range(rows // 8):
    counts.update(next(it)['source'].tolist())
  shares = [counts[0] / sum(counts.values()), counts[1] / sum(counts.values())]
  assert shares == pytest.approx([0.7, 0.3], abs=0.02)
  plain = next(data.train_iterator(mixture_cfg, VOCAB, batch_size=8, seed=0, process_index=0,
                                   process_count=1))
  assert set(plain) == {'inputs', 'targets', 'num_bytes'}


def test_mixture_resumes_exactly(mixture_cfg):
  make = lambda: data.train_iterator(mixture_cfg, VOCAB, batch_size=4, seed=3, process_index=0,  # pylint: disable=unnecessary-lambda-assignment
                                     process_count=1, keep_source=True)
  it = make()
  for _ in range(37):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(20)]
  restored = make()
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_mixture_evaluates_each_source(mixture_cfg):
  assert data.source_names(mixture_cfg) == mixture_cfg.source.split(',')
  per_source = data.eval_iterators(mixture_cfg, VOCAB, batch_size=4, process_index=0,
                                   process_count=1)
  assert list(per_source) == data.source_names(mixture_cfg)
  together = data.eval_iterator(mixture_cfg, VOCAB, batch_size=4, process_index=0,
                                process_count=1)
  assert len(together) == sum(len(b) for b in per_source.values())
  masked = [int(sum(b['mask'].sum() for b in batches)) for batches in per_source.values()]
  assert all(m > 0 for m in masked)


@pytest.mark.parametrize('weights, message', [
    ('0.7', '1 weight'), ('0.7,x', 'not a comma-separated'), ('1,-1', 'positive')])
def test_bad_weights_name_the_key(mixture_cfg, weights, message):
  cfg = mixture_cfg.copy_and_resolve_references()
  cfg.weights = weights
  with pytest.raises(UserError, match=f'data.weights: .*{message}'):
    data.validate_config(cfg)
