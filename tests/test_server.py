"""The OpenAI-compatible server: concurrent requests (streaming and not) give jaxtrain.generate's
tokens, streams end with the usage chunk and [DONE], stop strings and max_tokens end requests
with the right finish_reason, malformed or oversized requests (a generated table of hundreds)
get a 4xx JSON error naming the field and never a 5xx, a client that hangs up does not wedge
the engine, and `bench serve` against the server reports every metric."""

import concurrent.futures
import json
import random
import time

import httpx
import pytest

import jaxtrain
from jaxtrain import cli
from jaxtrain import model as model_lib
from jaxtrain.serving import bench as bench_lib
from jaxtrain.serving import server as server_lib

TINY = model_lib.ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                             d_ff=80, max_seq_len=128)
PROMPTS = [[5, 7, 11, 3, 2], list(range(1, 20)), [4], [9, 9, 8, 1, 60, 2, 33]]
TIMEOUT = httpx.Timeout(60.0)


CHARS = [chr(32 + i) for i in range(95)] + ["\u00e9", "\u00f1"]  # one character per token id


class CharTokenizer:
  """One character per token (text and ids map one to one); id 0 (a space) is EOS."""
  eos_id = 0
  bos_id = None
  vocab_size = len(CHARS)

  def encode(self, text):
    return [CHARS.index(c) if c in CHARS else 1 for c in text]

  def decode(self, ids):
    return "".join(CHARS[i] for i in ids)


@pytest.fixture(scope="module")
def model():
  return model_lib.create(TINY, seed=1)


@pytest.fixture(scope="module")
def server(model):
  engine = server_lib.make_engine(model, CharTokenizer(), slots=3, max_len=128, chunk=4,
                                  max_prompt_tokens=32)
  app = server_lib.CompletionServer(engine, CharTokenizer(), model_name="tiny",
                                    limits=server_lib.Limits(max_body_bytes=4096, max_tokens=120))
  submitted = []
  submit = engine.submit
  engine.submit = lambda r: submitted.append(submit(r)) or r  # to look at requests afterwards
  http = server_lib.BackgroundServer(app.app).start()
  http.submitted = submitted
  yield http
  http.close()
  engine.stop()


def post(server, body, **kw):
  return httpx.post(f"{server.url}/v1/completions", json=body, timeout=TIMEOUT, **kw)


def stream(server, body):
  """(text, events as parsed JSON, whether it ended with [DONE])."""
  events, done = [], False
  with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                    timeout=TIMEOUT) as r:
    assert r.status_code == 200, r.read()
    for line in r.iter_lines():
      if not line.startswith("data: "):
        continue
      assert not done, "data after [DONE]"
      if line == "data: [DONE]":
        done = True
      else:
        events.append(json.loads(line[6:]))
  text = "".join(c["text"] for e in events for c in e.get("choices", []))
  return text, events, done


def test_concurrent_requests_streaming_and_not_equal_generate(server, model):
  n = 12
  expected = jaxtrain.generate(model, PROMPTS, max_new_tokens=n)  # no tokenizer: no EOS

  def one(i):
    body = {"prompt": PROMPTS[i % 4], "max_tokens": n, "temperature": 0, "ignore_eos": True}
    if i % 2:
      text, events, done = stream(server, body)
      assert done and events[-1]["choices"][0]["finish_reason"] == "length"
      return text
    r = post(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": len(PROMPTS[i % 4]), "completion_tokens": n,
                            "total_tokens": len(PROMPTS[i % 4]) + n}
    return out["choices"][0]["text"]

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    texts = list(pool.map(one, range(8)))  # more requests than slots: some wait for one
  want = [CharTokenizer().decode(r.tokens) for r in expected]
  assert texts == [want[i % 4] for i in range(8)]


def test_text_prompt_stream_has_usage_chunk_then_done(server):
  body = {"prompt": "def f(x):", "max_tokens": 7, "temperature": 0, "ignore_eos": True,
          "stream_options": {"include_usage": True}, "model": "tiny"}
  text, events, done = stream(server, body)
  assert done
  usage_chunk = events[-1]
  assert usage_chunk["choices"] == [] and usage_chunk["usage"] == {
      "prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}
  assert all(e["usage"] is None for e in events[:-1])
  plain = post(server, {k: v for k, v in body.items() if k != "stream_options"}).json()
  assert text == plain["choices"][0]["text"]


def test_stop_string_ends_with_stop_and_never_leaks_into_the_stream(server):
  base = {"prompt": [5, 7, 11, 3, 2], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
  full = post(server, base).json()["choices"][0]["text"]
  assert len(full) == 40  # one character per token
  stop = full[20:23]
  cut = full.find(stop)
  out = post(server, {**base, "stop": [stop, "never-there"]}).json()
  assert out["choices"][0]["finish_reason"] == "stop"
  assert out["choices"][0]["text"] == full[:cut]
  text, events, done = stream(server, {**base, "stop": stop})
  assert done and text == full[:cut] and events[-1]["choices"][0]["finish_reason"] == "stop"
  out = post(server, {**base, "max_tokens": 3}).json()
  assert out["choices"][0]["finish_reason"] == "length" and out["choices"][0]["text"] == full[:3]


def test_models_and_health(server):
  models = httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).json()
  (m,) = models["data"]
  assert m["id"] == "tiny" and m["jaxtrain"]["param_bytes"] > 0
  assert m["jaxtrain"]["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4
  assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).json() == {"status": "ok"}


GOOD = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}
BAD_FIELDS = [  # (field, bad values); each is tried in place of GOOD's or added to it
    ("prompt", [None, 3, 2.5, True, "", [], [-1], [97], [1.5], [[1], [2]], ["a", "b"],
                [True], {"a": 1}, list(range(33)), "x" * 40, [[]]]),
    ("max_tokens", [0, -1, 2.5, "2", True, [], 10 ** 30, 121, 126]),
    ("temperature", [-0.1, "0", [], True, 1e9, 10 ** 400]),
    ("top_p", [0, -1, 1.5, "1", False, 10 ** 400]),
    ("top_k", [-2, 1.5, "3", True]),
    ("seed", [1.5, "1", 2 ** 64, True]),
    ("stop", [3, [3], [""], "", ["x"] * 17, ["x" * 300], {"a": 1}]),
    ("stream", ["yes", 1, []]),
    ("stream_options", [3, "x", []]),
    ("ignore_eos", ["no", 0]),
    ("model", ["gpt-4", 3, []]),
    ("n", [2, "1", True, 0]),
    ("best_of", [3]),
    ("echo", [True]),
    ("logprobs", [1, 5]),
    ("presence_penalty", [0.5]),
    ("frequency_penalty", [1]),
    ("logit_bias", [{"1": 100}]),
]
RAW_BODIES = [b"", b"{", b"[1, 2]", b'"prompt"', b"null", b"3", b'{"prompt": NaN}',
              b'{"prompt": [1], "temperature": Infinity}', b"\xff\xfe\x00",
              b"[" * 5000 + b"]" * 5000, b'{"prompt": [1], "max_tokens": 1e999}',
              b'{"max_tokens": 2}', b'{"prompt": ' + b"[" * 800 + b"]" * 800 + b"}",
              b'{"prompt": [1], "top_p": ' + b"[" * 800 + b"]" * 800 + b"}"]


def malformed_table(n_random=300, seed=0):
  """(description, raw body, headers) of requests that must all get a 4xx."""
  cases = []
  for field, values in BAD_FIELDS:
    for v in values:
      cases.append((f"{field}={v!r}"[:60], json.dumps({**GOOD, field: v}).encode(), {}))
  cases.append(("stream_options without stream",
                json.dumps({**GOOD, "stream_options": {"include_usage": True}}).encode(), {}))
  cases.append(("include_usage not bool", json.dumps(
      {**GOOD, "stream": True, "stream_options": {"include_usage": "y"}}).encode(), {}))
  cases += [(f"raw {b[:20]!r}", b, {}) for b in RAW_BODIES]
  cases.append(("oversized body", json.dumps({**GOOD, "pad": "x" * 5000}).encode(), {}))
  rng = random.Random(seed)
  junk = [None, True, -1, 0, 2 ** 70, 1e308, -1e-9, "", "\u2603" * 3, [], [None], {}, [[1]],
          {"x": [1]}, "x" * 300, list(range(200))]
  keys = [k for k, _ in BAD_FIELDS]
  while len(cases) < len(BAD_FIELDS) + n_random:
    # Random mutations of the good request: each body breaks at least one field for sure.
    body = dict(GOOD)
    field, values = rng.choice(BAD_FIELDS)
    body[field] = rng.choice(values)
    for _ in range(rng.randrange(3)):
      body[rng.choice(keys)] = rng.choice(junk)
    if rng.random() < 0.2:
      body.pop("prompt", None)
    raw = json.dumps(body).encode()
    if rng.random() < 0.1:
      raw = raw[:rng.randrange(len(raw))]
    cases.append((f"random {raw[:50]!r}", raw, {}))
  return cases


def _broken_by_junk(raw):
  """Random junk may by chance leave a valid request: such bodies are allowed a 200."""
  try:
    body = json.loads(raw)
  except ValueError:
    return True
  return not (isinstance(body, dict) and body.get("prompt") is not None)


def test_malformed_and_oversized_requests_get_4xx_json_errors_and_the_server_keeps_serving(
    server):
  cases = malformed_table()
  assert len(cases) >= 300
  with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
    for what, raw, headers in cases:
      r = client.post("/v1/completions", content=raw,
                      headers={"content-type": "application/json", **headers})
      assert r.status_code < 500, (what, r.status_code, r.text)
      if r.status_code == 200:  # a random mutation that happened to be valid
        assert what.startswith("random") and not _broken_by_junk(raw), (what, r.text)
        continue
      assert 400 <= r.status_code < 500, (what, r.status_code)
      error = r.json()["error"]
      assert error["message"] and error["type"], (what, error)
    # Fields named: one check per kind of error.
    for field in ("prompt", "max_tokens", "temperature", "top_p", "stop", "model", "n"):
      values = dict(BAD_FIELDS)[field]
      r = client.post("/v1/completions", json={**GOOD, field: values[0]})
      assert r.json()["error"]["param"] == field, (field, r.text)
    assert client.post("/v1/completions", content=b"x" * 5000).status_code == 413
    assert client.get("/v1/nope").status_code == 404
    assert "error" in client.get("/v1/completions").json()  # 405
    r = client.post("/v1/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_a_client_that_hangs_up_mid_stream_does_not_wedge_the_engine(server):
  body = {"prompt": [3, 4, 5], "max_tokens": 120, "temperature": 0, "ignore_eos": True,
          "stream": True}
  before = len(server.submitted)
  for _ in range(4):  # more hang-ups than slots
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as r:
      for line in r.iter_lines():
        if line.startswith("data: {"):
          break  # hang up after the first chunk
  r = post(server, {**GOOD, "max_tokens": 5, "ignore_eos": True})
  assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
  hung_up = server.submitted[before:before + 4]
  for request in hung_up:
    request.wait(timeout=30)
  # Each was cancelled, freeing its slot early, rather than decoding to max_tokens.
  assert [r.finish_reason for r in hung_up] == ["cancelled"] * 4
  assert all(len(r.tokens) < 120 for r in hung_up), [len(r.tokens) for r in hung_up]


def test_bench_serve_against_the_server_reports_every_metric(server, tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert cli.main(["bench", "serve", f"--url={server.url}", "--num-prompts=5",
                   "--random-input-len=8", "--random-output-len=6", "--max-concurrency=3",
                   f"--result-file={out}"]) == 0
  table = capsys.readouterr().out
  saved = json.loads(out.read_text())
  assert saved["completed"] == 5 and saved["total_output_tokens"] == 30
  assert saved["total_input_tokens"] == 40
  for metric in ("ttft", "tpot", "itl", "e2el"):
    for stat in ("mean", "median", "std", "p99"):
      assert saved[f"{stat}_{metric}_ms"] >= 0, (metric, stat)
  for key in ("request_throughput", "output_throughput", "total_token_throughput", "duration"):
    assert saved[key] > 0
  assert saved["decode_bandwidth"]["achieved_gbs"] > 0
  assert saved["model"] == "tiny" and saved["server"]["slots"] == 3
  # Poisson arrivals at a finite rate, through the Python API.
  poisson = bench_lib.run_bench(url=server.url, num_prompts=3, input_len=4, output_len=3,
                                request_rate=50.0, seed=1, log=None)
  assert poisson["completed"] == 3 and poisson["request_rate"] == 50.0
  # Text prompts, for servers that take text only; prompt tokens counted from the usage.
  text = bench_lib.run_bench(url=server.url, num_prompts=2, input_len=5, output_len=3,
                             prompt_type="text", tokenizer=CharTokenizer(), log=None)
  assert text["completed"] == 2 and text["total_input_tokens"] == 10
  for line in ("Request throughput (req/s)", "Mean TTFT (ms)", "P99 TPOT (ms)",
               "Median ITL (ms)", "Mean E2EL (ms)", "Decode bandwidth"):
    assert line in table, table


def _fake_stream(lines, pause_before_done=0.0):
  """An app whose completions stream these SSE data lines (no usage), then [DONE]."""
  import asyncio  # pylint: disable=import-outside-toplevel
  import fastapi  # pylint: disable=import-outside-toplevel
  from fastapi import responses  # pylint: disable=import-outside-toplevel
  app = fastapi.FastAPI()

  @app.post("/v1/completions")
  async def completions():
    async def sse():
      for line in lines:
        yield f"data: {line}\n\n"
      await asyncio.sleep(pause_before_done)
      yield "data: [DONE]\n\n"
    return responses.StreamingResponse(sse(), media_type="text/event-stream")
  return app


def _bench_one(app, max_tokens=16):
  import asyncio  # pylint: disable=import-outside-toplevel
  http = server_lib.BackgroundServer(app).start()

  async def one():
    async with httpx.AsyncClient() as client:
      one_request = bench_lib._one  # pylint: disable=protected-access
      return await one_request(client, f"{http.url}/v1/completions", {"max_tokens": max_tokens},
                               30)
  try:
    return asyncio.run(one())
  finally:
    http.close()


def test_bench_counts_tokens_and_latency_as_vllm_without_usage_and_survives_junk():
  chunk = lambda text, reason=None: json.dumps(
      {"choices": [{"index": 0, "text": text, "finish_reason": reason}]})
  # 4 chunks of 4 tokens, stopped at max_tokens, no usage; a pause before [DONE].
  out = _bench_one(_fake_stream([chunk("abcd")] * 3 + [chunk("efgh", "length")], 0.3))
  assert out["error"] is None and out["output_tokens"] == 16
  assert out["e2el"] < 0.25  # at the last chunk with tokens, not at the end of the stream
  # Stopped early without usage: one token per chunk, flagged.
  out = _bench_one(_fake_stream([chunk("ab"), chunk("c", "stop")]))
  assert out["output_tokens"] == 2 and out["estimated"]
  # A payload that is not an object fails this request alone.
  out = _bench_one(_fake_stream([chunk("ab"), '"keepalive"']))
  assert out["error"].startswith("AttributeError")


def test_decode_bandwidth_counts_the_rows_decoding_and_a_gpu_reads_every_slot():
  result = {"mean_tpot_ms": 10.0, "mean_decoding_requests": 0.6}
  info = {"param_bytes": 1000, "kv_bytes_per_token": 10, "slots": 8, "max_len": 256,
          "platform": "cpu"}
  args = dict(num_prompts=50, max_concurrency=None, input_len=64, output_len=64)
  cpu = bench_lib.bandwidth(result, info, **args)
  assert cpu["decode_batch"] == 0.6 and cpu["kv_bytes_per_step"] == int(0.6 * 96 * 10)
  gpu = bench_lib.bandwidth(result, {**info, "platform": "gpu"}, **args)
  assert gpu["kv_bytes_per_step"] == 8 * 256 * 10


def test_poisson_send_times_offer_the_rate_asked():
  times = bench_lib.arrival_times(8, 4.0, seed=0)
  assert times == sorted(times) and times[-1] == pytest.approx(2.0)
  assert bench_lib.arrival_times(3, float("inf"), seed=0) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("args, culprit", [
    (["serve"], "--workdir"),
    (["serve", "--workdir=tests/fixtures/hf/mha", "--port=99999"], "99999"),
    (["serve", "--workdir=tests/fixtures/hf/mha", "--slots=0"], "--slots"),
    (["serve", "--workdir=no/such/dir", "--port=0"], "no/such/dir"),
    (["bench"], "serve"),
    (["bench", "serv"], "did you mean serve?"),
    (["bench", "serve"], "--url"),
    (["bench", "serve", "--url=http://127.0.0.1:1"], "cannot reach"),
    (["bench", "serve", "--url=http://x", "--num-prompts=many"], "--num-prompts"),
    (["bench", "serve", "--url=http://x", "--slots=2"], "--slots"),
    (["bench", "serve", "--workdir=no/such/dir", "--request-rate=0"], "--request-rate"),
])
def test_serve_and_bench_bad_input_is_one_line_and_exit_2(args, culprit, capsys):
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert culprit in err and len(err.splitlines()) == 1, err


def test_a_client_that_times_out_on_a_plain_request_cancels_it(server, monkeypatch):
  """Starlette does not cancel a non-streaming endpoint when its client leaves: the server
  watches the connection. Decode is slowed so that 120 tokens take about 1.5 s."""
  from jaxtrain.serving import engine as engine_lib  # pylint: disable=import-outside-toplevel
  decode = engine_lib.gen.decode

  def slow_decode(*args, **kwargs):
    time.sleep(0.05)
    return decode(*args, **kwargs)

  monkeypatch.setattr(engine_lib.gen, "decode", slow_decode)
  body = {"prompt": [3, 4, 5], "max_tokens": 120, "temperature": 0, "ignore_eos": True}
  before = len(server.submitted)
  for _ in range(4):  # more time-outs than slots
    with pytest.raises(httpx.TimeoutException):
      httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(0.3))
  timed_out = server.submitted[before:before + 4]
  for request in timed_out:
    request.wait(timeout=30)
  assert [r.finish_reason for r in timed_out] == ["cancelled"] * 4
  assert all(len(r.tokens) < 120 for r in timed_out), [len(r.tokens) for r in timed_out]


def test_a_huge_top_k_is_top_k_off_and_harms_nobody(server):
  body = {"prompt": [3, 4, 5], "max_tokens": 8, "temperature": 1.0, "seed": 5}
  off = post(server, {**body, "top_k": 0}).json()["choices"][0]["text"]
  r = post(server, {**body, "top_k": 2 ** 40})
  assert r.status_code == 200 and r.json()["choices"][0]["text"] == off


def test_a_request_that_fails_to_start_fails_alone(model, monkeypatch):
  from jaxtrain.serving import engine as engine_lib  # pylint: disable=import-outside-toplevel
  make = engine_lib.gen.Sampling.make

  def make_or_fail(temperature, top_k, top_p, seeds):
    if seeds == [666]:
      raise OverflowError("seed 666")
    return make(temperature, top_k, top_p, seeds)

  monkeypatch.setattr(engine_lib.gen.Sampling, "make", make_or_fail)
  engine = engine_lib.Engine(model, slots=2, max_len=64, chunk=4)
  requests = [engine.submit(engine_lib.Request(prompt=[1, 2], max_tokens=5, seed=seed))
              for seed in (1, 666, 2)]
  engine.run_until_idle()
  assert [r.finish_reason for r in requests] == ["length", "error", "length"]
  assert "OverflowError: seed 666" in requests[1].error


def test_the_earliest_stop_string_in_the_text_ends_it_whatever_its_place_in_the_list(model):
  """Both stop strings arrive in one decode chunk (text positions 1..8: the first token comes
  from the prefill alone), the one listed second first."""
  run = lambda stop: jaxtrain.generate(model, [[3, 4, 5]], max_new_tokens=12, chunk=8,
                                       tokenizer=CharTokenizer(), stop=stop)[0]
  text = run(()).text
  firsts = [p for p in range(1, 9) if text.index(text[p]) == p]
  assert len(firsts) >= 2, text
  early, late = text[firsts[0]], text[firsts[-1]]
  out = run((late, early))
  assert out.text == text[:firsts[0]] and out.finish_reason == "stop"


class SentencePieceLike(CharTokenizer):
  """Every token is a word "▁c"; like SentencePiece, decoding drops the leading space."""

  def decode(self, ids):
    return "".join(" " + CHARS[i] for i in ids).lstrip(" ")


def test_completion_text_keeps_what_depends_on_the_prompt():
  """A completion's text is what its tokens add to the prompt's: "a b" + " c d", not "c d"."""
  tok = SentencePieceLike()
  model = model_lib.create(TINY, seed=1)
  out = jaxtrain.generate(model, [[40, 41]], max_new_tokens=4, tokenizer=tok)[0]
  whole = tok.decode([40, 41] + out.tokens)
  assert out.text == whole[len(tok.decode([40, 41])):] and out.text.startswith(" ")


def test_engine_cancel_frees_an_active_slot_and_drops_a_waiting_request(model):
  from jaxtrain.serving import engine as engine_lib  # pylint: disable=import-outside-toplevel
  engine = engine_lib.Engine(model, slots=1, max_len=64, chunk=4)
  active = engine.submit(engine_lib.Request(prompt=[1, 2, 3], max_tokens=60))
  waiting = engine.submit(engine_lib.Request(prompt=[4, 5], max_tokens=60))
  engine.step()  # `active` is prefilled into the only slot, `waiting` waits
  engine.cancel(active)
  engine.cancel(waiting)
  after = engine.submit(engine_lib.Request(prompt=[6], max_tokens=3))
  engine.run_until_idle()
  assert active.finish_reason == waiting.finish_reason == "cancelled"
  assert len(active.tokens) < 60 and waiting.tokens == []
  assert after.finish_reason == "length" and len(after.tokens) == 3
