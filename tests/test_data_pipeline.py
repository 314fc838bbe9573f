"""The Grain training and evaluation pipelines: determinism, sharding, packing, exact resume."""

import json
import math
import random

import grain
import numpy as np
import pytest
from etils import epath

import jaxtrain.data as data
from jaxtrain.data import pipeline, store
from jaxtrain.errors import UserError

VOCAB = 320
SEQ_LEN = 32
_WORDS = ('alpha beta gamma delta def return import class self lambda yield café naïve 日本 '
          'über 😀 print value index token row batch').split()


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  """A prepared corpus of 40 small documents (about 60 rows of 33 tokens per epoch)."""
  root = tmp_path_factory.mktemp('pipeline')
  rng = random.Random(1)
  (root / 'corpus').mkdir()
  for i in range(40):
    words = ' '.join(rng.choice(_WORDS) for _ in range(rng.randint(5, 60)))
    (root / 'corpus' / f'd{i:02d}.txt').write_text(f'document {i}: {words}\n', encoding='utf-8')
  config = data.default_config()
  config.source = str(root / 'corpus')
  config.data_dir = str(root / 'data')
  config.seq_len = SEQ_LEN
  config.validation_fraction = 0.1
  data.prepare(config, VOCAB)
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def stored_docs(cfg, split='train'):
  prepared = store.prepare(cfg, VOCAB)
  source = grain.sources.ArrayRecordDataSource(prepared.split_paths(split))
  return prepared, [prepared.decode_record(source[i]) for i in range(len(source))]


def test_batches_have_the_promised_shapes_and_values(cfg):
  batch = next(data.train_iterator(cfg, VOCAB, 4, process_index=0, process_count=1))
  assert set(batch) == {'inputs', 'targets', 'num_bytes'}
  assert batch['inputs'].shape == batch['targets'].shape == (4, SEQ_LEN)
  assert batch['num_bytes'].shape == (4,)
  assert all(v.dtype == np.int32 for v in batch.values())
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert batch['inputs'].min() >= 0 and batch['targets'].max() < VOCAB
  assert (batch['num_bytes'] > 0).all()


def test_num_bytes_counts_the_text_behind_the_targets(cfg):
  tok = data.load_tokenizer(cfg, VOCAB)
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  vocab = Tokenizer.from_file(str(store.prepare(cfg, VOCAB).directory / 'tokenizer.json'))
  batches = take(data.train_iterator(cfg, VOCAB, 4, process_index=0, process_count=1), 5)
  for batch in batches:
    for targets, num_bytes in zip(batch['targets'], batch['num_bytes']):
      # Byte-level BPE: each character of a vocab entry stands for one byte; EOS for none.
      expected = sum(len(vocab.id_to_token(int(t))) for t in targets if t != tok.eos_id)
      assert num_bytes == expected


def test_same_seed_same_batches_other_seed_other_batches(cfg):
  def first(seed, shuffle_seed=0):
    cfg_copy = cfg.copy_and_resolve_references()
    cfg_copy.shuffle_seed = shuffle_seed
    return take(data.train_iterator(cfg_copy, VOCAB, 4, seed=seed, process_index=0,
                                    process_count=1), 6)
  assert_same_batches(first(0), first(0))
  assert not np.array_equal(first(0)[0]['inputs'], first(1)[0]['inputs'])
  assert not np.array_equal(first(0)[0]['inputs'], first(0, shuffle_seed=5)[0]['inputs'])


def epoch_documents(cfg, *, seed, process_index, process_count):
  """The documents one process sees in its first epoch, recovered by splitting rows at EOS."""
  prepared, docs = stored_docs(cfg)
  mine = docs[process_index::process_count]
  stream_len = sum(d.shape[1] + 1 for d in mine)
  dataset = pipeline.train_dataset(prepared, seq_len=SEQ_LEN, batch_size=1, seed=seed,
                                   process_index=process_index, process_count=process_count)
  batches = take(iter(dataset), math.ceil(stream_len / (SEQ_LEN + 1)))
  rows = [np.concatenate([b['inputs'][0], b['targets'][0, -1:]]) for b in batches]
  stream = np.concatenate(rows)[:stream_len]
  assert stream[-1] == prepared.eos_id
  cuts = np.flatnonzero(stream == prepared.eos_id)
  found = [tuple(seg) for seg in np.split(stream, cuts + 1)[:-1]]
  found = [seg[:-1] for seg in found]  # drop the EOS itself
  return sorted(found), sorted(tuple(d[0]) for d in mine)


def test_packing_loses_and_duplicates_no_token_in_an_epoch(cfg):
  found, expected = epoch_documents(cfg, seed=3, process_index=0, process_count=1)
  assert found == expected


def test_processes_read_disjoint_documents(cfg):
  seen = []
  for index in range(3):
    found, expected = epoch_documents(cfg, seed=3, process_index=index, process_count=3)
    assert found == expected
    seen.append(set(found))
  assert not seen[0] & seen[1] and not seen[0] & seen[2] and not seen[1] & seen[2]
  _, docs = stored_docs(cfg)
  assert seen[0] | seen[1] | seen[2] == {tuple(d[0]) for d in docs}


def test_epochs_are_reshuffled(cfg):
  prepared, docs = stored_docs(cfg)
  dataset = pipeline.train_dataset(prepared, seq_len=SEQ_LEN, batch_size=1, seed=0,
                                   process_index=0, process_count=1, num_epochs=2)
  stream = np.concatenate([np.concatenate([b['inputs'][0], b['targets'][0, -1:]])
                           for b in dataset])
  cuts = np.flatnonzero(stream == prepared.eos_id)
  order = [tuple(seg[:-1]) for seg in np.split(stream, cuts + 1)[:-1]]
  n = len(docs)
  assert sorted(order[:n]) == sorted(tuple(d[0]) for d in docs)
  # The finite stream drops its unfinished last row, so epoch two may miss its last document.
  second = order[n:]
  assert len(second) >= n - 1 and set(second) <= set(order[:n])
  assert second != order[:len(second)]


@pytest.mark.parametrize('steps_before', [1, 7, 70])  # 70 crosses into the second epoch
def test_resume_from_saved_state_gives_the_same_batches(cfg, steps_before):
  kwargs = dict(seed=11, process_index=0, process_count=1)
  reference = take(data.train_iterator(cfg, VOCAB, 2, **kwargs), steps_before + 9)
  interrupted = data.train_iterator(cfg, VOCAB, 2, **kwargs)
  take(interrupted, steps_before)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = data.train_iterator(cfg, VOCAB, 2, **kwargs)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 9), reference[steps_before:])


def test_resume_through_grains_orbax_checkpoint_handler(cfg, tmp_path):
  kwargs = dict(seed=2, process_index=0, process_count=1)
  reference = take(data.train_iterator(cfg, VOCAB, 3, **kwargs), 12)
  interrupted = data.train_iterator(cfg, VOCAB, 3, **kwargs)
  take(interrupted, 5)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=interrupted)
  resumed = handler.restore(epath.Path(tmp_path),
                            item=data.train_iterator(cfg, VOCAB, 3, **kwargs))
  assert_same_batches(take(resumed, 7), reference[5:])


def test_more_processes_than_documents_is_a_user_error(cfg):
  prepared, _ = stored_docs(cfg)
  with pytest.raises(UserError, match='cannot be shared by 1000 processes'):
    pipeline.train_dataset(prepared, seq_len=SEQ_LEN, batch_size=2, seed=0, process_index=0,
                           process_count=1000)


def test_global_batches_do_not_depend_on_the_process_count(cfg):
  """Process p of n yields rows [p * b, (p + 1) * b) of the one-process global batch, and the
  iterator state (the same on every process) resumes on another process count."""
  kwargs = dict(seed=5)
  one = take(data.train_iterator(cfg, VOCAB, 6, process_index=0, process_count=1, **kwargs), 8)
  iters = [data.train_iterator(cfg, VOCAB, 2, process_index=p, process_count=3, **kwargs)
           for p in range(3)]
  three = [take(it, 4) for it in iters]
  for step in range(4):
    for key in one[step]:
      joined = np.concatenate([three[p][step][key] for p in range(3)])
      np.testing.assert_array_equal(joined, one[step][key])
  states = [json.dumps(it.get_state(), sort_keys=True) for it in iters]
  assert states[0] == states[1] == states[2]
  halves = []
  for p in range(2):  # three processes stopped at step 4; two carry on
    it = data.train_iterator(cfg, VOCAB, 3, process_index=p, process_count=2, **kwargs)
    it.set_state(json.loads(states[0]))
    halves.append(take(it, 4))
  for step in range(4):
    for key in one[step]:
      np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]),
                                    one[4 + step][key])


def test_eval_batches_are_deterministic_masked_and_cover_every_target(cfg):
  prepared, docs = stored_docs(cfg, 'validation')
  stream_len = sum(d.shape[1] + 1 for d in docs)
  evals = data.eval_iterator(cfg, VOCAB, 3, process_index=0, process_count=1)
  batches = list(evals)
  assert len(batches) == len(evals) > 0
  assert_same_batches(batches, list(evals))
  assert set(batches[0]) == {'inputs', 'targets', 'num_bytes', 'mask'}
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == stream_len - 1  # every token but the very first is a target once
  total_bytes = prepared.splits['validation']['bytes']
  assert sum(b['num_bytes'].sum() for b in batches) == total_bytes - docs[0][1, 0]
  last = batches[-1]
  assert (last['targets'][last['mask'] == 0] == 0).all()
  assert len(data.eval_iterator(cfg, VOCAB, 3, max_batches=1, process_index=0,
                                process_count=1)) == 1


def test_eval_processes_split_each_global_batch(cfg):
  whole = list(data.eval_iterator(cfg, VOCAB, 4, split='train', max_batches=5,
                                  process_index=0, process_count=1))
  parts = [list(data.eval_iterator(cfg, VOCAB, 2, split='train', max_batches=5,
                                   process_index=p, process_count=2)) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for k, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          batch[key], np.concatenate([parts[0][k][key], parts[1][k][key]]))


def test_worker_processes_give_resumable_batches(cfg):
  cfg_workers = cfg.copy_and_resolve_references()
  cfg_workers.worker_count = 1
  kwargs = dict(seed=4, process_index=0, process_count=1)
  iterators = [data.train_iterator(cfg_workers, VOCAB, 2, **kwargs) for _ in range(2)]
  try:
    reference = take(iterators[0], 6)
    state = json.loads(json.dumps(iterators[0].get_state()))
    iterators[1].set_state(state)
    assert_same_batches(take(iterators[1], 4), take(iterators[0], 4))
    assert all(type(v) is np.ndarray for v in reference[0].values())  # pylint: disable=unidiomatic-typecheck
  finally:
    for it in iterators:
      it.close()
