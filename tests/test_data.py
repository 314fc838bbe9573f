"""Data sources, tokenizers, preparation and bad input (jaxtrain.data); the pipeline has its own file."""

import json
import pathlib
import random

import numpy as np
import pytest

import jaxtrain.data as data
from jaxtrain.data import corpus, store
from jaxtrain.data import tokenizer as tokenizer_lib
from jaxtrain.errors import UserError

VOCAB = 320
_WORDS = ('alpha beta gamma delta def return import class self lambda yield café naïve 日本 '
          'über 😀 print value index token row batch').split()


def make_texts(n: int, seed: int = 0) -> list[str]:
  """Small, varied, deterministic documents (some non-ASCII) for quick BPE training."""
  rng = random.Random(seed)
  texts = []
  for i in range(n):
    lines = [' '.join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
             for _ in range(rng.randint(2, 12))]
    texts.append(f'doc {i}\n' + '\n'.join(lines) + '\n')
  return texts


def write_txt_corpus(directory: pathlib.Path, texts) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  for i, text in enumerate(texts):
    (directory / f'doc{i:03d}.txt').write_text(text, encoding='utf-8')
  return directory


def config(tmp_path: pathlib.Path, source: str, **overrides):
  cfg = data.default_config()
  cfg.source = source
  cfg.data_dir = str(tmp_path / 'data')
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def one_line(exc_info) -> str:
  message = str(exc_info.value)
  assert '\n' not in message
  return message


# --- config -------------------------------------------------------------------------------------


def test_default_config_has_documented_keys_and_honours_env(monkeypatch):
  monkeypatch.setenv('JAXTRAIN_DATA_DIR', '/somewhere/else')
  cfg = data.default_config()
  assert cfg.data_dir == '/somewhere/else'
  assert (cfg.source, cfg.tokenizer, cfg.seq_len, cfg.text_field) == ('default', 'bpe', 256, 'text')
  assert (cfg.shuffle_seed, cfg.max_docs, cfg.worker_count) == (0, 0, 0)
  assert 0 < cfg.validation_fraction < 0.1
  monkeypatch.delenv('JAXTRAIN_DATA_DIR')
  assert data.default_config().data_dir == '~/.cache/jaxtrain/data'
  data.validate_config(data.default_config())


@pytest.mark.parametrize('key,value', [
    ('seq_len', 0), ('max_docs', -1), ('worker_count', -2), ('shuffle_seed', -1),
    ('validation_fraction', 0.0), ('validation_fraction', 1.5), ('text_field', ''),
    ('source', ''), ('source', 'tfds:'), ('tokenizer', ''),
])
def test_validate_config_names_the_bad_key(key, value):
  cfg = data.default_config()
  cfg[key] = value
  with pytest.raises(UserError) as e:
    data.validate_config(cfg)
  assert one_line(e).startswith(f'data.{key}:')


def test_validate_config_rejects_unknown_keys():
  cfg = data.default_config()
  cfg.unlock()
  cfg.sequence_length = 3
  with pytest.raises(UserError, match='data.sequence_length: unknown key'):
    data.validate_config(cfg)


# --- bad input ------------------------------------------------------------------------------------


def test_missing_source_path_is_a_user_error(tmp_path):
  missing = tmp_path / 'nope' / 'corpus.txt'
  cfg = config(tmp_path, str(missing))
  with pytest.raises(UserError) as e:
    data.validate_config(cfg)
  assert 'data.source' in one_line(e) and str(missing) in one_line(e)
  with pytest.raises(UserError):
    data.prepare(cfg, VOCAB)
  with pytest.raises(UserError, match='no files match'):
    data.validate_config(config(tmp_path, str(tmp_path / '*.jsonl')))


def test_empty_file_is_a_user_error_naming_it(tmp_path):
  corpus_dir = write_txt_corpus(tmp_path / 'c', make_texts(3))
  empty = corpus_dir / 'empty.txt'
  empty.write_text('')
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, str(corpus_dir)), VOCAB)
  assert one_line(e) == f'{empty}: empty file'


def test_binary_file_is_a_user_error_naming_it(tmp_path):
  corpus_dir = write_txt_corpus(tmp_path / 'c', make_texts(3))
  binary = corpus_dir / 'blob.txt'
  binary.write_bytes(random.Random(0).randbytes(4096))
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, str(corpus_dir)), VOCAB)
  assert one_line(e).startswith(f'{binary}: not UTF-8 text')


def test_jsonl_line_without_text_field_names_file_and_line(tmp_path):
  path = tmp_path / 'docs.jsonl'
  lines = [json.dumps({'text': t}) for t in make_texts(4)]
  lines.insert(2, json.dumps({'body': 'no text here'}))
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, str(path)), VOCAB)
  assert one_line(e).startswith(f'{path}:3: no \'text\' field')


def test_invalid_json_line_names_file_and_line(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text(json.dumps({'text': 'fine'}) + '\n\n{"text": broken\n')
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, str(path)), VOCAB)
  assert one_line(e).startswith(f'{path}:3: invalid JSON')


def test_missing_tokenizer_path_is_a_user_error(tmp_path):
  corpus_dir = write_txt_corpus(tmp_path / 'c', make_texts(3))
  missing = tmp_path / 'tok' / 'tokenizer.json'
  cfg = config(tmp_path, str(corpus_dir), tokenizer=str(missing))
  with pytest.raises(UserError) as e:
    data.validate_config(cfg)
  assert one_line(e) == f'data.tokenizer: no such file: {missing}'
  with pytest.raises(UserError) as e:
    tokenizer_lib.load(missing)
  assert str(missing) in one_line(e)


def test_corrupt_tokenizer_file_is_a_user_error(tmp_path):
  bad = tmp_path / 'tokenizer.json'
  bad.write_text('{"not": "a tokenizer"}')
  with pytest.raises(UserError) as e:
    tokenizer_lib.load(bad)
  assert one_line(e).startswith(f'{bad}: not a HuggingFace tokenizer.json')
  bad_model = tmp_path / 'x.model'
  bad_model.write_bytes(b'garbage')
  with pytest.raises(UserError) as e:
    tokenizer_lib.load(bad_model)
  assert one_line(e).startswith(f'{bad_model}: not a sentencepiece model')


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
  corpus_dir = write_txt_corpus(tmp_path / 'c', make_texts(6))
  (corpus_dir / 'latin1.txt').write_bytes('caf\xe9 au lait\nmore text here\n'.encode('latin-1'))
  stats = data.prepare(config(tmp_path, str(corpus_dir)), VOCAB)
  assert sum(s['replaced_chars'] for s in stats.values()) == 1
  assert corpus.decode_utf8(b'ok \xef\xbf\xbd \xff') == ('ok \ufffd \ufffd', 1)


def test_vocab_too_small_for_the_tokenizer(tmp_path):
  corpus_dir = write_txt_corpus(tmp_path / 'c', make_texts(4))
  with pytest.raises(UserError, match='vocab_size=200 is too small'):
    data.prepare(config(tmp_path, str(corpus_dir)), 200)
  data.prepare(config(tmp_path, str(corpus_dir)), VOCAB)
  tok_dir = tmp_path / 'tok'
  data.load_tokenizer(config(tmp_path, str(corpus_dir)), VOCAB).save(tok_dir)
  cfg = config(tmp_path, str(corpus_dir), tokenizer=str(tok_dir / 'tokenizer.json'))
  with pytest.raises(UserError) as e:
    data.prepare(cfg, 258)
  assert one_line(e).startswith('data.tokenizer:')


# --- local sources ------------------------------------------------------------------------------


def test_local_txt_corpus_prepares_once_and_counts_exact_bytes(tmp_path, capfd):
  texts = make_texts(40)
  cfg = config(tmp_path, str(write_txt_corpus(tmp_path / 'c', texts)))
  stats = data.prepare(cfg, VOCAB)
  assert set(stats) == {'train', 'validation'}
  assert stats['train']['documents'] + stats['validation']['documents'] == 40
  assert stats['validation']['documents'] >= 1
  assert sum(s['bytes'] for s in stats.values()) == sum(len(t.encode()) for t in texts)
  assert data.prepare(cfg, VOCAB) == stats  # cached
  out, err = capfd.readouterr()
  assert out == '' and err == ''
  cfg.max_docs = 10
  small = data.prepare(cfg, VOCAB)
  assert small['train']['documents'] + small['validation']['documents'] == 10


def test_jsonl_corpus_uses_text_field_and_skips_blank_lines(tmp_path):
  texts = make_texts(12)
  path = tmp_path / 'docs.jsonl'
  path.write_text('\n'.join(json.dumps({'content': t, 'id': i}) for i, t in enumerate(texts))
                  + '\n\n')
  stats = data.prepare(config(tmp_path, str(path), text_field='content'), VOCAB)
  assert sum(s['documents'] for s in stats.values()) == 12
  assert sum(s['bytes'] for s in stats.values()) == sum(len(t.encode()) for t in texts)


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path):
  texts = make_texts(6)
  path = tmp_path / 'bom.jsonl'
  path.write_bytes(b'\xef\xbb\xbf' + ''.join(json.dumps({'text': t}) + '\n'
                                             for t in texts).encode())
  stats = data.prepare(config(tmp_path, str(path)), VOCAB)
  assert sum(s['documents'] for s in stats.values()) == 6


def test_many_small_files_make_few_units_and_shards(tmp_path):
  """300 small files (before: a unit and two shard files each, all held open by training)."""
  texts = make_texts(300)
  for i, text in enumerate(texts):
    (tmp_path / 'c' / f'{i // 100}').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'c' / f'{i // 100}' / f'f{i:03d}.txt').write_text(text)
  assert corpus.LocalCorpus(str(tmp_path / 'c'), 'text', 0, 0.1).units() == [0]
  stats = data.prepare(config(tmp_path, str(tmp_path / 'c')), VOCAB)
  assert sum(s['documents'] for s in stats.values()) == 300
  shards = list((tmp_path / 'data').rglob('*.array_record'))
  assert 1 <= len(shards) <= 2, len(shards)


def test_a_single_document_is_split_by_lines(tmp_path):
  path = tmp_path / 'book.txt'
  path.write_text(''.join(f'line {i} of the only document\n' for i in range(100)))
  stats = data.prepare(config(tmp_path, str(path), validation_fraction=0.1), VOCAB)
  assert stats['train']['documents'] == stats['validation']['documents'] == 1
  assert stats['train']['bytes'] + stats['validation']['bytes'] == path.stat().st_size
  one_line_file = tmp_path / 'line.txt'
  one_line_file.write_text('just one line')
  with pytest.raises(UserError, match='single one-line document'):
    data.prepare(config(tmp_path, str(one_line_file)), VOCAB)


def test_split_follows_each_document_name():
  names = [f'file{i}.txt' for i in range(400)]
  is_val = corpus.choose_validation(names, 0.1)
  assert 20 < sum(is_val) < 60
  # A document keeps its split when the rest of the corpus changes.
  assert corpus.choose_validation(names[:200], 0.1) == is_val[:200]
  assert corpus.choose_validation(['a', 'b'], 0.01).count(True) == 1


@pytest.mark.parametrize('pattern', ['c1/**/*.jsonl', 'c1', 'c1/sub1/a.jsonl'])
def test_document_names_stay_when_files_are_added_higher_up(tmp_path, pattern):
  """Names (and so splits) are paths below the source's own directory, not below the deepest
  directory common to today's files, which moved up when c1/other/c.jsonl arrived."""
  (tmp_path / 'c1' / 'sub1').mkdir(parents=True)
  for name in ('a', 'b'):
    (tmp_path / 'c1' / 'sub1' / f'{name}.jsonl').write_text(json.dumps({'text': name}) + '\n')
  source = str(tmp_path / pattern)

  def names():
    files = corpus.LocalCorpus(source, 'text', 0, 0.1).files
    return {f.name: files.name(i) for i, f in enumerate(files.files)}

  before = names()
  (tmp_path / 'c1' / 'other').mkdir()
  (tmp_path / 'c1' / 'other' / 'c.jsonl').write_text(json.dumps({'text': 'c'}) + '\n')
  after = names()
  assert {k: v for k, v in after.items() if k in before} == before


# --- the default corpus and tfds: --------------------------------------------------------------


def test_stdlib_files_exclude_tests():
  _, names = corpus.stdlib_files()
  assert 'os.py' in names and 'unittest/case.py' in names
  assert 5 <= sum(corpus.choose_validation(names, 0.02)) <= 40
  for name in names:
    parts = set(name.split('/'))
    assert not parts & {'test', 'tests', 'idle_test', 'site-packages'}, name


def test_default_corpus_is_a_tfds_arrayrecord_dataset(tmp_path, capfd):
  cfg = config(tmp_path, 'default', max_docs=8)
  stats = data.prepare(cfg, VOCAB)
  assert stats['train']['documents'] + stats['validation']['documents'] == 8
  assert stats['validation']['documents'] >= 1
  out, err = capfd.readouterr()
  assert out == '' and err == ''
  stdlib = corpus.StdlibCorpus(cfg.data_dir, 8, cfg.validation_fraction)
  builder = stdlib.builder()
  assert builder.is_prepared()
  assert list(pathlib.Path(builder.data_dir).glob('*.array_record-*'))
  paths = [ex['path'].decode() for ex in builder.as_data_source('train')]
  assert all(not set(p.split('/')) & {'test', 'tests'} for p in paths)
  # The same dataset, named as any other prepared TFDS dataset.
  tfds_cfg = config(tmp_path, f'tfds:jaxtrain_stdlib/{stdlib.config_name}')
  assert data.prepare(tfds_cfg, VOCAB) == stats


def test_unprepared_tfds_dataset_is_a_user_error(tmp_path):
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, 'tfds:no_such_dataset_anywhere'), VOCAB)
  assert one_line(e).startswith('data.source:')


# --- tokenizers -----------------------------------------------------------------------------------


def test_byte_counts_always_add_up():
  counts = tokenizer_lib.byte_counts(np.array([3, 3, 2, 7]), 9)
  assert counts.tolist() == [3, 0, 0, 6]
  assert tokenizer_lib.byte_counts(np.array([], np.int64), 5).size == 0


def test_bpe_round_trips_text_and_counts_bytes(tmp_path):
  texts = make_texts(30)
  tok = tokenizer_lib.train_bpe(texts, VOCAB)
  assert tok.vocab_size <= VOCAB and tok.bos_id is None
  sample = 'naïve café 日本 😀\n\tdef f(x): return x  # <|endoftext|> inside text\n'
  ids = tok.encode(sample)
  assert tok.decode(ids) == sample
  assert tok.eos_id not in ids  # a document cannot invent its own separator
  for text, (ids, counts) in zip(texts + [sample], tok.encode_with_bytes(texts + [sample])):
    assert ids.dtype == np.int32 and len(ids) == len(counts)
    assert counts.sum() == len(text.encode('utf-8'))
  tok.save(tmp_path / 'tok')
  loaded = tokenizer_lib.load(tmp_path / 'tok')
  assert loaded.encode(sample) == tok.encode(sample)
  assert (loaded.eos_id, loaded.vocab_size) == (tok.eos_id, tok.vocab_size)


def test_non_byte_level_tokenizer_json_counts_bytes_from_offsets(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  texts = make_texts(20)
  hf = Tokenizer(models.WordLevel(unk_token='[UNK]'))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=['[UNK]', '</s>']))
  hf.save(str(tmp_path / 'tokenizer.json'))
  tok = tokenizer_lib.load(tmp_path / 'tokenizer.json')
  assert tok.eos_id == hf.token_to_id('</s>')
  sample = '  naïve   café 😀 unknownword\n\n'
  for text, (_, counts) in zip(texts + [sample], tok.encode_with_bytes(texts + [sample])):
    assert counts.sum() == len(text.encode('utf-8'))
  cfg = config(tmp_path, str(write_txt_corpus(tmp_path / 'c', texts)),
               tokenizer=str(tmp_path / 'tokenizer.json'))
  stats = data.prepare(cfg, 1000)
  assert sum(s['bytes'] for s in stats.values()) == sum(len(t.encode()) for t in texts)


def test_a_tokenizer_json_with_truncation_or_padding_tokenizes_documents_whole(tmp_path):
  texts = make_texts(20)
  hf = _word_level(['[UNK]', '</s>'])
  plain = tokenizer_lib.load(_saved(hf, tmp_path / 'plain'))
  hf.enable_truncation(4)
  hf.enable_padding(length=64, pad_id=0)
  tok = tokenizer_lib.load(_saved(hf, tmp_path / 'fixed'))
  text = texts[0]
  assert len(plain.encode(text)) > 4
  assert tok.encode(text) == plain.encode(text)
  assert [ids.tolist() for ids, _ in tok.encode_with_bytes([text])] == [plain.encode(text)]
  assert tokenizer_lib.same_as_saved(tok, tmp_path / 'plain')  # the settings change no ids


def test_same_as_saved_tells_a_retrained_bpe_apart(tmp_path):
  a = tokenizer_lib.train_bpe(make_texts(40), 300)
  b = tokenizer_lib.train_bpe(make_texts(40)[:20] + ['zebra quokka ' * 50], 300)
  a.save(tmp_path / 'a')
  assert tokenizer_lib.same_as_saved(a, tmp_path / 'a')
  assert not tokenizer_lib.same_as_saved(b, tmp_path / 'a')


def test_the_cache_key_of_a_tokenizer_json_covers_its_tokenizer_config(tmp_path):
  hf = _word_level(['[UNK]', '</s>', '<eot>'])
  path = _saved(hf, tmp_path / 'tok')
  key = store._tokenizer_key(str(path), VOCAB)  # pylint: disable=protected-access
  (tmp_path / 'tok' / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<eot>'}))
  assert store._tokenizer_key(str(path), VOCAB) != key  # pylint: disable=protected-access
  assert tokenizer_lib.load(path).eos_id == hf.token_to_id('<eot>')


def test_add_bos_token_false_means_prompts_start_without_bos(tmp_path):
  """As transformers does: a GPT-2-style config names a bos_token but does not prepend it."""
  hf = _word_level(['[UNK]', '<s>', '</s>'])
  path = _saved(hf, tmp_path / 'tok')
  assert tokenizer_lib.load(path).bos_id == hf.token_to_id('<s>')  # found among the candidates
  config = {'bos_token': '<s>', 'eos_token': '</s>', 'add_bos_token': False}
  (tmp_path / 'tok' / 'tokenizer_config.json').write_text(json.dumps(config))
  tok = tokenizer_lib.load(path)
  assert tok.bos_id is None and tok.eos_id == hf.token_to_id('</s>')
  tok.save(tmp_path / 'saved')
  assert tokenizer_lib.load(tmp_path / 'saved').bos_id is None
  assert tokenizer_lib.same_as_saved(tok, tmp_path / 'saved')


def _word_level(specials):
  """A small word-level HF tokenizer over make_texts(20) with these special tokens."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  hf = Tokenizer(models.WordLevel(unk_token='[UNK]'))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.train_from_iterator(make_texts(20), trainers.WordLevelTrainer(special_tokens=specials))
  return hf


def _saved(hf, directory):
  directory.mkdir()
  hf.save(str(directory / 'tokenizer.json'))
  return directory / 'tokenizer.json'


def test_sentencepiece_model(tmp_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  texts = make_texts(40)
  (tmp_path / 'train.txt').write_text(''.join(texts))
  spm.SentencePieceTrainer.train(input=str(tmp_path / 'train.txt'),
                                 model_prefix=str(tmp_path / 'sp'), vocab_size=310, hard_vocab_limit=False,
                                 byte_fallback=True, minloglevel=2)
  tok = tokenizer_lib.load(tmp_path / 'sp.model')
  assert tok.eos_id >= 0 and tok.bos_id is not None
  sample = 'naïve   café 😀 ☃ zzz\n\n  indented\n'
  for text, (ids, counts) in zip(texts + [sample], tok.encode_with_bytes(texts + [sample])):
    assert counts.sum() == len(text.encode('utf-8'))
    assert ids.max() < tok.vocab_size
  tok.save(tmp_path / 'saved')
  assert tokenizer_lib.load(tmp_path / 'saved').encode(sample) == tok.encode(sample)
  cfg = config(tmp_path, str(write_txt_corpus(tmp_path / 'c', texts)),
               tokenizer=str(tmp_path / 'sp.model'))
  data.prepare(cfg, 400)
  assert data.load_tokenizer(cfg, 400).encode(sample) == tok.encode(sample)


def test_prepared_files_live_under_data_dir(tmp_path):
  cfg = config(tmp_path, str(write_txt_corpus(tmp_path / 'c', make_texts(8))))
  data.prepare(cfg, VOCAB)
  prepared = store.prepare(cfg, VOCAB)
  assert prepared.directory.is_relative_to(tmp_path / 'data')
  assert (prepared.directory / 'tokenizer.json').is_file()
  assert all(pathlib.Path(p).is_file() for p in prepared.split_paths('train'))
  with pytest.raises(UserError, match="split 'test' does not exist"):
    prepared.split_paths('test')
