"""Decoding: the cached path equals recomputing the full forward, batching and slots change
nothing, sampling is per request, the cache never wraps, and nothing retraces after warm-up."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain
from jaxtrain import model as model_lib
from jaxtrain.errors import UserError
from jaxtrain.serving import engine as engine_lib
from jaxtrain.serving import generate as gen

TINY = model_lib.ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                             d_ff=80, max_seq_len=64)
PROMPTS = [[5, 7, 11, 3, 2], list(range(1, 20)), [4], [9, 9, 8, 1, 60, 2, 33]]


@pytest.fixture(scope="module")
def model():
  return model_lib.create(TINY, seed=1)


def _greedy_by_full_forward(model, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(jnp.argmax(model(jnp.asarray([seq]))[0, -1])))
  return seq[len(prompt):]


def test_greedy_decoding_with_the_cache_equals_argmax_of_the_full_forward(model):
  for prompt in PROMPTS[:2]:
    out = jaxtrain.generate(model, [prompt], max_new_tokens=12)[0]
    assert out.tokens == _greedy_by_full_forward(model, prompt, 12)
    assert out.finish_reason == "length"


def test_prompts_of_different_lengths_in_one_batch_equal_one_at_a_time(model):
  together = [r.tokens for r in jaxtrain.generate(model, PROMPTS, max_new_tokens=10)]
  alone = [jaxtrain.generate(model, [p], max_new_tokens=10)[0].tokens for p in PROMPTS]
  assert together == alone


def test_sampled_tokens_depend_on_the_request_not_on_its_batch_mates(model):
  kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
  together = [r.tokens for r in jaxtrain.generate(model, PROMPTS[:3], **kw)]
  # Prompt i of a batch uses seed (seed, i): the same prompt alone with slot 0 differs ...
  first_alone = jaxtrain.generate(model, [PROMPTS[0]], **kw)[0].tokens
  assert together[0] == first_alone
  # ... and another seed gives another sample.
  assert jaxtrain.generate(model, [PROMPTS[0]], **{**kw, "seed": 4})[0].tokens != first_alone


def test_top_k_1_and_tiny_top_p_are_greedy(model):
  greedy = jaxtrain.generate(model, [PROMPTS[1]], max_new_tokens=8)[0].tokens
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = jaxtrain.generate(model, [PROMPTS[1]], max_new_tokens=8, temperature=2.0, seed=5, **kw)
    assert out[0].tokens == greedy


def test_engine_output_does_not_change_with_what_else_is_in_the_engine(model):
  engine = engine_lib.Engine(model, slots=3, max_len=64, chunk=4)
  probe = dict(prompt=PROMPTS[3], max_tokens=12, temperature=0.8, top_k=30, seed=11)
  alone = engine.submit(engine_lib.Request(**probe))
  engine.run_until_idle()
  # Now with others arriving before and after, finishing at other times, in other slots.
  others = [engine.submit(engine_lib.Request(prompt=p, max_tokens=m, temperature=t, seed=i))
            for i, (p, m, t) in enumerate([(PROMPTS[0], 3, 0.0), (PROMPTS[1], 20, 1.0)])]
  crowded = engine.submit(engine_lib.Request(**probe))
  late = engine.submit(engine_lib.Request(prompt=PROMPTS[2], max_tokens=5))
  engine.run_until_idle()
  assert crowded.tokens == alone.tokens and len(alone.tokens) == 12
  assert all(r.finish_reason == "length" for r in others + [late])
  assert [len(r.tokens) for r in others + [late]] == [3, 20, 5]


def test_no_retrace_after_warm_up(model):
  engine = engine_lib.Engine(model, slots=2, max_len=64, chunk=4)
  engine.warmup(prompt_lens=(3, 20))  # buckets 16 and 32
  before = dict(gen.TRACES)
  for i, p in enumerate(PROMPTS * 2):
    engine.submit(engine_lib.Request(prompt=p, max_tokens=3 + i, temperature=0.5 * (i % 2),
                                     top_k=i, seed=i))
  engine.run_until_idle()
  assert dict(gen.TRACES) == before


def test_decoding_the_first_rows_equals_decoding_all_and_leaves_the_rest_alone(model):
  weights = model_lib.serving_weights(model)
  T, B = 32, len(PROMPTS)
  tokens = np.zeros((B, T), np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in PROMPTS], np.int32)
  sampling = gen.Sampling.make([0.0] * B, [0] * B, [1.0] * B, range(B))

  def fresh_state():
    first, prefix = gen.prefill(TINY, weights, tokens, lengths, sampling)
    return gen.insert(gen.DecodeState.empty(TINY, B, 64), prefix, first, sampling, 0)

  _, all_rows = gen.decode(TINY, weights, fresh_state(), 5)
  before = jax.tree.map(np.asarray, fresh_state())
  after, two_rows = gen.decode(TINY, weights, fresh_state(), 5, 2)
  np.testing.assert_array_equal(two_rows, np.asarray(all_rows)[:, :2])
  assert after.cache.lengths_B.tolist() == (lengths + [5, 5, 0, 0]).tolist()
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    if old.ndim:  # rows 2 and 3 (cache, last token, sampling) are untouched
      np.testing.assert_array_equal(np.asarray(new)[2:], old[2:])
  # A released row (length 0) stays free through decoding and changes nothing for the others.
  after, tokens_free = gen.decode(TINY, weights, gen.release(fresh_state(), 1), 5, 2)
  assert after.cache.lengths_B.tolist()[:2] == [lengths[0] + 5, 0]
  np.testing.assert_array_equal(np.asarray(tokens_free)[:, 0], np.asarray(all_rows)[:, 0])
  assert model_lib.decode_rows(3, 8, "cpu") == 4 and model_lib.decode_rows(3, 8, "gpu") == 8
  assert model_lib.decode_rows(7, 6, "cpu") == 6


def test_a_warm_engine_decodes_only_the_occupied_slots_and_frees_them(model, monkeypatch):
  engine = engine_lib.Engine(model, slots=4, max_len=64, chunk=4)
  engine.warmup(prompt_lens=(5,))
  assert engine.warm_rows == (1, 2, 4)
  rows, decode = [], gen.decode

  def spy(*args):
    rows.append(args[4])
    return decode(*args)

  monkeypatch.setattr(gen, "decode", spy)
  probe = dict(prompt=PROMPTS[0], max_tokens=12)
  alone = engine.submit(engine_lib.Request(**probe))
  engine.run_until_idle()
  assert set(rows) == {1}
  rows.clear()
  # Three requests take slots 0, 1, 2 (4 rows); when the short ones end, only slot 0 is left.
  crowded = engine.submit(engine_lib.Request(**probe))
  short = [engine.submit(engine_lib.Request(prompt=p, max_tokens=3)) for p in PROMPTS[1:3]]
  engine.run_until_idle()
  assert rows[0] == 4 and rows[-1] == 1 and rows == sorted(rows, reverse=True)
  assert crowded.tokens == alone.tokens and len(alone.tokens) == 12
  assert [len(r.tokens) for r in short] == [3, 3]
  assert engine.state.cache.lengths_B.tolist() == [0] * 4  # every slot released


def test_cache_writes_past_its_end_are_dropped_not_wrapped(model):
  empty = model_lib.KVCache.empty(TINY, 2, 4)
  cache = model_lib.KVCache(empty.ks_BKSH, empty.vs_BKSH, jnp.asarray([3, 4], jnp.int32))
  _, new = model_lib.decode(TINY, model_lib.serving_weights(model), jnp.asarray([5, 7]), cache)
  for buffers in (new.ks_BKSH, new.vs_BKSH):
    kv_LBKSH = np.stack([np.asarray(x) for x in buffers])
    assert (kv_LBKSH[:, 0, :, 3] != 0).all() and (kv_LBKSH[:, 0, :, :3] == 0).all()
    assert (kv_LBKSH[:, 1] == 0).all()  # row 1 was full: nothing written, position 0 untouched
  assert new.lengths_B.tolist() == [4, 5]


def test_windowed_decode_attention_equals_reading_the_whole_cache():
  B, N, K, H, S = 3, 4, 2, 8, 64
  assert model_lib.cache_windows(S, "cpu")[:3] == (16, 24, 32)
  assert model_lib.cache_windows(S, "gpu") == (S,)
  rng = np.random.default_rng(0)
  q, k1, v1 = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in [(B, 1, N, H), (B, 1, K, H), (B, 1, K, H)])
  k, v = (jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.float32) for _ in range(2))
  windowed = jax.jit(model_lib.decode_attention)
  whole = model_lib._decode_attention  # pylint: disable=protected-access
  # Longest rows 16, 17, 40 and 64: the first, second, a middle and the whole window.
  for lengths in ([0, 3, 16], [17, 1, 5], [40, 2, 39], [64, 63, 0]):
    lengths_B = jnp.asarray(lengths, jnp.int32)
    np.testing.assert_allclose(windowed(q, k1, v1, k, v, lengths_B),
                               whole(q, k1, v1, k, v, lengths_B),
                               rtol=1e-6, atol=1e-6)


def test_serving_weights_are_fused_and_in_the_compute_dtype():
  c = dataclasses.replace(TINY, dtype="bfloat16")
  bf16_model = model_lib.create(c, seed=2)
  weights = model_lib.serving_weights(bf16_model)
  D, N, K, H, F = c.d_model, c.n_heads, c.kv_heads, c.dim_per_head, c.d_ff
  layer = weights["layers"][1]
  assert layer["wqkv"].shape == (D, (N + 2 * K) * H) and layer["w_gate_up"].shape == (D, 2 * F)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(weights))
  wk = bf16_model.blocks.attn.wk[...][1].reshape(D, K * H).astype(jnp.bfloat16)
  assert (layer["wqkv"][:, N * H:(N + K) * H] == wk).all()
  # A step reads every weight but the embedding table, of which only the batch's rows.
  n = model_lib.param_counts(c)["total"] - c.vocab_size * D
  assert model_lib.serving_bytes_per_step(weights, 4) == 2 * (n + 4 * D)
  out = jaxtrain.generate(bf16_model, [PROMPTS[0]], max_new_tokens=4)[0]
  assert len(out.tokens) == 4 and all(0 <= t < c.vocab_size for t in out.tokens)


def test_bad_requests_are_user_errors_naming_the_problem(model):
  engine = engine_lib.Engine(model, slots=1, max_len=32, max_prompt_len=16)
  for request, match in [(dict(prompt=[]), "empty"), (dict(prompt=[1] * 17), "17 tokens"),
                         (dict(prompt=[1], max_tokens=40), "exceeds"),
                         (dict(prompt=[500]), "token ids"), (dict(prompt=[1], top_p=0.0), "top_p")]:
    with pytest.raises(UserError, match=match):
      engine.submit(engine_lib.Request(**request))
  with pytest.raises(UserError, match="tokenizer"):
    jaxtrain.generate(model, ["text"], max_new_tokens=2)


def test_generate_cli_bad_input_exits_2_with_one_line(capsys):
  from jaxtrain import cli
  assert cli.main(["generate", "--prompt=x"]) == 2
  assert cli.main(["generate", "--workdir=tests/fixtures/hf/mha"]) == 2
  assert cli.main(["generate", "--workdir=tests/fixtures/hf/mha", "--prompt=x"]) == 2  # no tokenizer
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3 and all(line.startswith("error: ") for line in err)


# A tiny HF directory with a trained BPE tokenizer: text prompts, EOS and stop strings.


@pytest.fixture(scope="module")
def hf_dir_with_tokenizer(tmp_path_factory):
  from jaxtrain import convert  # pylint: disable=import-outside-toplevel
  from jaxtrain.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  c = model_lib.ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                            max_seq_len=64)
  directory = tmp_path_factory.mktemp("hf_tiny")
  convert.save_hf(model_lib.create(c, seed=0), c, str(directory))
  texts = ["once upon a time there was a tiny model", "hello world, hello tokens"] * 20
  tokenizer_lib.train_bpe(texts, 300).save(directory)
  return str(directory)


def test_eos_and_stop_strings_end_a_request_where_they_occur(hf_dir_with_tokenizer):
  model, tokenizer = jaxtrain.load_model(hf_dir_with_tokenizer)
  engine = engine_lib.Engine(model, tokenizer, slots=2, max_len=64, chunk=4)
  prompt = tokenizer.encode("hello world")
  free = engine.submit(engine_lib.Request(prompt=prompt, max_tokens=16))
  engine.run_until_idle()
  assert free.finish_reason == "length" and len(free.tokens) == 16
  # EOS: the request ends before the first occurrence of the EOS id, which is not emitted.
  eos = free.tokens[5]
  ended = engine.submit(engine_lib.Request(prompt=prompt, max_tokens=16, eos_id=eos))
  # A stop string: the text ends before it, and the tokens agree with the text.
  text = free.text
  stop = text[len(text) // 2:len(text) // 2 + 3]
  cut = text.find(stop)
  stopped = engine.submit(engine_lib.Request(prompt=prompt, max_tokens=16, stop=(stop,)))
  engine.run_until_idle()
  assert ended.finish_reason == "stop" and ended.tokens == free.tokens[:free.tokens.index(eos)]
  assert stopped.finish_reason == "stop" and stopped.text == text[:cut]
  assert text.startswith(tokenizer.decode(stopped.tokens))
  assert len(tokenizer.decode(stopped.tokens)) <= cut


def test_generate_verb_prints_the_continued_text(hf_dir_with_tokenizer, capsys):
  from jaxtrain import cli
  code = cli.main(["generate", f"--workdir={hf_dir_with_tokenizer}", "--prompt=hello world",
                   "--max-new-tokens=5", "--temperature=0.7", "--top-p=0.9", "--seed=1"])
  out = capsys.readouterr().out
  assert code == 0 and out.startswith("hello world") and len(out.strip()) > len("hello world")


def test_generate_verb_takes_token_ids_for_a_directory_without_a_tokenizer(capsys):
  from jaxtrain import cli
  code = cli.main(["generate", "--workdir=tests/fixtures/hf/mha", "--prompt-ids=1,2,3",
                   "--max-new-tokens=3"])
  out = capsys.readouterr().out.strip().split(",")
  assert code == 0 and len(out) == 3 and all(t.isdigit() for t in out)
  for flags in (["--prompt-ids=1,x"], ["--prompt-ids=1,100000"],
                ["--prompt-ids=1", "--max-new-tokens=100"]):
    assert cli.main(["generate", "--workdir=tests/fixtures/hf/mha"] + flags) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3 and "--prompt-ids" in err[0] and "vocabulary" in err[1]
  assert "max_seq_len" in err[2]


def test_decode_benchmark_dry_run_in_bf16_with_the_cpu_windows():
  """benchmarks/decode.py as gpu_run.sh calls it on a GPU (bf16, jaxtrain's side only), here on
  the toy model, with --windows=eighths (in a subprocess: it patches model.cache_windows)."""
  out = subprocess.run(
      [sys.executable, "benchmarks/decode.py", "--size=toy", "--dtype=bfloat16", "--sides=jax",
       "--windows=eighths", "--batches=2", "--prompt=8", "--new=8", "--chunk=4", "--repeats=1"],
      capture_output=True, text=True, timeout=300, check=True).stdout
  assert "bfloat16" in out and "cache windows (16," in out
  row = [line for line in out.splitlines() if line.startswith("| 2 |")]
  assert row and float(row[0].split("|")[2]) > 0  # tokens/s measured

