"""A serving benchmark with vLLM's definitions (its `benchmark_serving`), for any OpenAI-compatible
server: ours (`jaxtrain serve`, or started in-process with --workdir) or vLLM's.

Each request streams (SSE) a random prompt of `input_len` token ids and asks for exactly
`output_len` tokens (`ignore_eos`). Per request, with t0 its send time:

  TTFT  time to first token: the first chunk with choices, minus t0
  E2EL  end-to-end latency: the last chunk with tokens minus t0
  TPOT  time per output token after the first: (E2EL - TTFT) / (output tokens - 1)
  ITL   inter-token latencies: the gaps between successive chunks (a server that sends several
        tokens per chunk, as ours does with chunk > 1, has fewer, longer gaps)

and over the run (duration: from the start of the schedule, first send included, to the last
end): request throughput (completed / duration), output token throughput (output tokens /
duration), total token throughput ((input + output tokens) / duration). Latencies are reported
in ms as mean, median, std and p99. Output tokens are the usage chunk's completion_tokens (a
server without one: the chunks' token_ids, else max_tokens for a request that stopped at the
length, else one per chunk, flagged in a note). A request that fails in any way counts as
failed, alone.

Arrivals are all at once (`request_rate` inf) or a Poisson process at `request_rate` requests/s,
its send times scaled as vLLM's so that the last is at requests / rate, and kept on that
schedule; `max_concurrency` caps the requests in flight.

Decode memory bandwidth achieved = bytes read per decode step / TPOT, where a decode step reads
the weights once and every in-flight row's KV cache so far: param_bytes + B x (input_len +
output_len / 2) x kv_bytes_per_token, B = the mean number of requests decoding (the sum of
their decode times over the duration), at most max_concurrency and slots. jaxtrain on a GPU
reads every slot's whole cache each step: there the KV term is slots x max_len x
kv_bytes_per_token. Our /v1/models gives those sizes; for another server pass --model-bytes (and
--kv-bytes-per-token) or the number is omitted with a note. The device's bandwidth comes from
jaxtrain/hardware.py.
"""

import asyncio
import json
import math
import time

import httpx
import numpy as np

from jaxtrain.errors import UserError

METRICS = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
           ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"))


def random_prompts(n, input_len, vocab_size, seed):
  """n prompts of exactly input_len token ids, avoiding ids 0-2 (special in most vocabularies)."""
  rng = np.random.default_rng(seed)
  low = 3 if vocab_size > 3 else 0
  return [rng.integers(low, vocab_size, size=input_len).tolist() for _ in range(n)]


def random_text_prompts(n, input_len, tokenizer, seed):
  """n random texts of about input_len tokens (for servers that take text only): random ids
  decoded, re-encoded and trimmed a few times until the count settles. The exact counts come
  back in each answer's usage."""
  rng = np.random.default_rng(seed)
  vocab = tokenizer.vocab_size
  texts = []
  for _ in range(n):
    ids = rng.integers(3 if vocab > 3 else 0, vocab, size=input_len).tolist()
    text = tokenizer.decode(ids)
    for _ in range(4):
      ids = tokenizer.encode(text)
      if len(ids) == input_len:
        break
      if len(ids) < input_len:
        ids = ids + rng.integers(3, vocab, size=input_len - len(ids)).tolist()
      text = tokenizer.decode(ids[:input_len])
    texts.append(text)
  return texts


def load_tokenizer(path):
  """The tokenizer of a jaxtrain workdir (its tokenizer/) or of an HF directory."""
  import os  # pylint: disable=import-outside-toplevel
  from jaxtrain import evaluate  # pylint: disable=import-outside-toplevel
  for directory in (os.path.join(path, "tokenizer"), path):
    tokenizer = evaluate._tokenizer_in(directory)  # pylint: disable=protected-access
    if tokenizer is not None:
      return tokenizer
  raise UserError(f"--tokenizer={path}: no tokenizer.json or sentencepiece .model there (nor "
                  "in its tokenizer/)")


def arrival_times(n, request_rate, seed):
  """Send times in seconds from the start: all 0 for inf, else a Poisson process (exponential
  gaps) scaled, as vLLM's benchmark does, so that the last send is at n / request_rate: the
  offered load is the rate asked, not the rate the sample happened to give."""
  if math.isinf(request_rate):
    return [0.0] * n
  rng = np.random.default_rng(seed + 1)
  times = np.cumsum(rng.exponential(1.0 / request_rate, size=n))
  return (times * (n / request_rate) / times[-1]).tolist()


async def _one(client, url, body, timeout):
  """Send one streaming request; a dict with its timings, output tokens and any error."""
  out = {"ttft": None, "itl": [], "e2el": None, "output_tokens": None, "prompt_tokens": None,
         "chunks": 0, "token_ids": 0, "finish_reason": None, "error": None}
  start = time.perf_counter()
  last = start
  try:
    async with client.stream("POST", url, json=body, timeout=timeout) as r:
      if r.status_code != 200:
        text = (await r.aread()).decode(errors="replace")
        out["error"] = f"HTTP {r.status_code}: {text[:200]}"
        return out
      done = False
      async for line in r.aiter_lines():  # to the end: the connection is then reused
        if done or not line.startswith("data:"):
          continue
        payload = line[5:].strip()
        if payload == "[DONE]":
          done = True
          continue
        data = json.loads(payload)
        if "error" in data:
          out["error"] = str(data["error"])[:200]
          done = True
          continue
        if data.get("choices"):
          now = time.perf_counter()
          if out["ttft"] is None:
            out["ttft"] = now - start
          else:
            out["itl"].append(now - last)
          last = now
          out["e2el"] = now - start  # at the last chunk with tokens (as vLLM's)
          out["chunks"] += 1
          choice = data["choices"][0]
          out["token_ids"] += len(choice.get("token_ids") or [])
          out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
        if data.get("usage"):
          out["output_tokens"] = data["usage"].get("completion_tokens")
          out["prompt_tokens"] = data["usage"].get("prompt_tokens")
  except Exception as e:  # pylint: disable=broad-except  (any failure is this request's alone)
    out["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out
  if out["ttft"] is None and out["error"] is None:
    out["error"] = "the stream had no tokens"
  if out["output_tokens"] is None:  # no usage chunk
    if out["token_ids"]:
      out["output_tokens"] = out["token_ids"]
    elif out["finish_reason"] == "length":  # it stopped at max_tokens: exactly that many
      out["output_tokens"] = body["max_tokens"]
    else:  # a guess: one token per chunk (flagged in the result)
      out["output_tokens"], out["estimated"] = out["chunks"], True
  return out


async def _run(url, model, prompts, output_len, send_times, max_concurrency, timeout):
  limit = max_concurrency or len(prompts)
  semaphore = asyncio.Semaphore(limit)
  endpoint = url.rstrip("/") + "/v1/completions"

  def body(prompt):
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

  limits = httpx.Limits(max_connections=limit + 1, max_keepalive_connections=limit + 1)
  async with httpx.AsyncClient(limits=limits) as client:
    # One request first, not counted (vLLM's bench does the same): checks the set-up, and a
    # server that compiles lazily compiles here rather than inside the measurement.
    probe = await _one(client, endpoint, body(prompts[0]), timeout)
    if probe["error"]:
      raise UserError(f"{url}: the test request failed: {probe['error']}")

    async def limited(prompt):
      async with semaphore:
        return await _one(client, endpoint, body(prompt), timeout)

    tasks = []
    start = time.perf_counter()
    for prompt, at in zip(prompts, send_times):
      wait = start + at - time.perf_counter()  # on the schedule: lateness does not add up
      if wait > 0:
        await asyncio.sleep(wait)
      tasks.append(asyncio.create_task(limited(prompt)))
    outputs = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
  return outputs, duration


def _stats(values_s):
  ms = np.asarray(values_s, np.float64) * 1000.0
  if ms.size == 0:
    return {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}
  return {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std()),
          "p99": float(np.percentile(ms, 99))}


def metrics(outputs, input_len, duration):
  """vLLM's metrics from per-request outputs (see the module docstring). Prompt tokens are the
  usage's where the server gave them, else input_len."""
  done = [o for o in outputs if o["error"] is None]
  n_out = [o["output_tokens"] for o in done]
  n_in = [o["prompt_tokens"] or input_len for o in done]
  result = {"completed": len(done), "failed": len(outputs) - len(done), "duration": duration,
            "total_input_tokens": int(sum(n_in)), "total_output_tokens": int(sum(n_out))}
  result["request_throughput"] = len(done) / duration
  result["output_throughput"] = result["total_output_tokens"] / duration
  result["total_token_throughput"] = (result["total_input_tokens"]
                                      + result["total_output_tokens"]) / duration
  values = {"ttft": [o["ttft"] for o in done],
            "tpot": [(o["e2el"] - o["ttft"]) / (n - 1) for o, n in zip(done, n_out) if n > 1],
            "itl": [gap for o in done for gap in o["itl"]],
            "e2el": [o["e2el"] for o in done]}
  for name, vs in values.items():
    for stat, v in _stats(vs).items():
      result[f"{stat}_{name}_ms"] = v
  errors = [o["error"] for o in outputs if o["error"] is not None]
  if errors:
    result["errors"] = errors[:5]
  estimated = sum(bool(o.get("estimated")) for o in done)
  if estimated:
    result["note"] = (f"{estimated} requests sent no usage and stopped before max_tokens: their "
                      "output tokens are counted as one per chunk")
  result["mean_decoding_requests"] = (sum(o["e2el"] - o["ttft"] for o in done) / duration
                                      if duration > 0 else 0.0)
  return result


def bandwidth(result, info, *, num_prompts, max_concurrency, input_len, output_len,
              model_bytes=None, kv_bytes_per_token=None, device_bandwidth_gbs=None):
  """Decode memory bandwidth achieved (see the module docstring), or a note saying why not."""
  info = info or {}
  weights = model_bytes or info.get("param_bytes")
  kv = kv_bytes_per_token if kv_bytes_per_token is not None else info.get("kv_bytes_per_token")
  if not weights:
    return {"note": "unknown model size: not a jaxtrain server, pass --model-bytes (and "
                    "--kv-bytes-per-token) for the decode bandwidth"}
  tpot_s = result["mean_tpot_ms"] / 1000.0
  if tpot_s <= 0:
    return {"note": "no TPOT (every request produced at most one token)"}
  # Rows decoding at a time, on average over the run (Little's law: the decode time of every
  # request over the duration), within what concurrency and slots allow.
  batch = min(result.get("mean_decoding_requests") or num_prompts, num_prompts,
              max_concurrency or num_prompts, info.get("slots") or num_prompts)
  if info.get("platform") not in (None, "cpu") and info.get("slots") and info.get("max_len"):
    # jaxtrain off the CPU decodes every slot over the whole cache (model.decode_rows,
    # model.cache_windows): that is what a step reads, however few requests there are.
    kv_bytes = info["slots"] * info["max_len"] * (kv or 0)
  else:
    kv_bytes = batch * (input_len + output_len / 2) * (kv or 0)
  step_bytes = weights + kv_bytes
  out = {"weight_bytes": int(weights), "kv_bytes_per_step": int(kv_bytes),
         "decode_batch": round(batch, 2), "bytes_per_step": int(step_bytes),
         "achieved_gbs": step_bytes / tpot_s / 1e9}
  if kv is None:
    out["note"] = "KV-cache bytes unknown (pass --kv-bytes-per-token): weights only"
  peak = device_bandwidth_gbs or info.get("device_bandwidth_gbs")
  if peak:
    out["device_bandwidth_gbs"] = peak
    out["fraction_of_device"] = out["achieved_gbs"] / peak
  else:
    kind = info.get("device_kind", "this device")
    out["device_note"] = (f"no bandwidth for {kind!r} in jaxtrain/hardware.py (CPU: pass "
                          "--device-bandwidth-gbs with a measured figure)")
  return out


def format_table(r):
  """vLLM's result table."""
  rows = [("Successful requests", r["completed"]), ("Failed requests", r["failed"]),
          ("Benchmark duration (s)", r["duration"]),
          ("Total input tokens", r["total_input_tokens"]),
          ("Total generated tokens", r["total_output_tokens"]),
          ("Request throughput (req/s)", r["request_throughput"]),
          ("Output token throughput (tok/s)", r["output_throughput"]),
          ("Total Token throughput (tok/s)", r["total_token_throughput"])]
  lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
  lines += [f"{k + ':':<40}{v:<10.2f}" if isinstance(v, float) else f"{k + ':':<40}{v:<10}"
            for k, v in rows]
  for name, title in METRICS:
    lines.append("{s:{c}^50}".format(s=title, c="-"))
    for stat in ("mean", "median", "std", "p99"):
      label = {"mean": "Mean", "median": "Median", "std": "Std", "p99": "P99"}[stat]
      lines.append(f"{f'{label} {name.upper()} (ms):':<40}{r[f'{stat}_{name}_ms']:<10.2f}")
  bw = r.get("decode_bandwidth", {})
  lines.append("{s:{c}^50}".format(s="Decode memory bandwidth", c="-"))
  if "achieved_gbs" in bw:
    lines.append(f"{'Decode bandwidth achieved (GB/s):':<40}{bw['achieved_gbs']:<10.2f}")
    lines.append(f"{'Bytes per decode step (MB):':<40}{bw['bytes_per_step'] / 1e6:<10.2f}")
    if "fraction_of_device" in bw:
      lines.append(f"{'Device bandwidth (GB/s):':<40}{bw['device_bandwidth_gbs']:<10.1f}")
      lines.append(f"{'Fraction of device bandwidth:':<40}{bw['fraction_of_device']:<10.3f}")
    else:
      lines.append(f"Decode bandwidth: {bw.get('device_note', '')}")
  else:
    lines.append(f"Decode bandwidth: {bw.get('note', 'not measured')}")
  for e in r.get("errors", []):
    lines.append(f"error: {e}")
  lines.append("=" * 50)
  return "\n".join(lines)


def server_model(url, model=None, timeout=30.0):
  """(model name, the jaxtrain info dict or None) from GET /v1/models."""
  try:
    r = httpx.get(url.rstrip("/") + "/v1/models", timeout=timeout)
  except httpx.HTTPError as e:
    raise UserError(f"--url={url}: cannot reach the server ({type(e).__name__}: {e})") from None
  if r.status_code != 200:
    raise UserError(f"--url={url}: GET /v1/models answered {r.status_code}")
  try:
    data = r.json()["data"]
  except (ValueError, KeyError, TypeError):
    raise UserError(f"--url={url}: /v1/models did not answer an OpenAI model list") from None
  if model is None:
    if not data:
      raise UserError(f"--url={url}: the server lists no model (pass --model)")
    model = data[0]["id"]
  info = next((m.get("jaxtrain") for m in data if m.get("id") == model), None)
  return model, info


def check_args(num_prompts, input_len, output_len, request_rate, max_concurrency):
  """UserError for numbers no benchmark can use (before anything is loaded or compiled)."""
  if num_prompts < 1 or input_len < 1 or output_len < 1:
    raise UserError("--num-prompts, --random-input-len and --random-output-len must be >= 1")
  if not request_rate > 0:
    raise UserError(f"--request-rate must be > 0 (inf: all at once), got {request_rate}")
  if max_concurrency is not None and max_concurrency < 1:
    raise UserError(f"--max-concurrency must be >= 1, got {max_concurrency}")


def run_bench(*, url, model=None, num_prompts=100, input_len=128, output_len=128,
              request_rate=float("inf"), max_concurrency=None, seed=0, result_file=None,
              vocab_size=None, model_bytes=None, kv_bytes_per_token=None,
              device_bandwidth_gbs=None, timeout=600.0, prompt_type="ids", tokenizer=None,
              log=print):
  """Benchmark the server at `url`; prints the table, writes `result_file`, returns the dict.

  prompt_type "ids" sends token-id prompts (OpenAI's API and vLLM take them); "text" sends
  random text made with `tokenizer` (an object or a directory), for servers that take text
  only."""
  check_args(num_prompts, input_len, output_len, request_rate, max_concurrency)
  if prompt_type not in ("ids", "text"):
    raise UserError(f"--prompt-type={prompt_type!r}: choose ids or text")
  if prompt_type == "text":
    if tokenizer is None:
      raise UserError("--prompt-type=text needs --tokenizer=DIR (a workdir or an HF directory)")
    if isinstance(tokenizer, str):
      tokenizer = load_tokenizer(tokenizer)
  model, info = server_model(url, model)
  if prompt_type == "text":
    prompts = random_text_prompts(num_prompts, input_len, tokenizer, seed)
  else:
    vocab = vocab_size or (info or {}).get("vocab_size") or 1000
    prompts = random_prompts(num_prompts, input_len, vocab, seed)
  send_times = arrival_times(num_prompts, request_rate, seed)
  outputs, duration = asyncio.run(_run(url, model, prompts, output_len, send_times,
                                       max_concurrency, timeout))
  result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "url": url, "model": model,
            "num_prompts": num_prompts, "random_input_len": input_len,
            "random_output_len": output_len, "prompt_type": prompt_type,
            "request_rate": request_rate,
            "max_concurrency": max_concurrency, "seed": seed, "server": info}
  result.update(metrics(outputs, input_len, duration))
  result["decode_bandwidth"] = bandwidth(
      result, info, num_prompts=num_prompts, max_concurrency=max_concurrency,
      input_len=input_len, output_len=output_len, model_bytes=model_bytes,
      kv_bytes_per_token=kv_bytes_per_token, device_bandwidth_gbs=device_bandwidth_gbs)
  if math.isinf(request_rate):
    result["request_rate"] = "inf"
  if log:
    log(format_table(result))
  if result_file:
    with open(result_file, "w") as f:
      json.dump(result, f, indent=2)
    if log:
      log(f"results: {result_file}")
  return result


def bench_workdir(workdir, *, slots=8, max_len=None, chunk=8, step=None, log=print, **kwargs):
  """`run_bench` against our server, started in-process on a free port of 127.0.0.1."""
  import jaxtrain  # pylint: disable=import-outside-toplevel
  from jaxtrain.serving import server as server_lib  # pylint: disable=import-outside-toplevel
  input_len = kwargs.get("input_len", 128)
  output_len = kwargs.get("output_len", 128)
  check_args(kwargs.get("num_prompts", 100), input_len, output_len,
             kwargs.get("request_rate", float("inf")), kwargs.get("max_concurrency"))
  text = kwargs.get("prompt_type") == "text"
  model, tokenizer = jaxtrain.load_model(workdir, step=step)
  if text and kwargs.get("tokenizer") is None:
    if tokenizer is None:
      raise UserError(f"--prompt-type=text: {workdir} has no tokenizer (pass --tokenizer=DIR)")
    kwargs["tokenizer"] = tokenizer
  slack = 8 if text else 0  # a text prompt may re-encode to a few more tokens (and a BOS)
  max_len = max_len or min(model.config.max_seq_len, _pow2(input_len + output_len + slack))
  if input_len + output_len + slack > max_len:
    raise UserError(f"--random-input-len + --random-output-len = {input_len + output_len} "
                    f"exceeds --max-len={max_len}" + (" (less 8 for text prompts)" if text else ""))
  engine = server_lib.make_engine(model, tokenizer, slots=slots, max_len=max_len, chunk=chunk,
                                  max_prompt_tokens=max(input_len + slack, max_len // 2), log=log)
  try:
    app = server_lib.CompletionServer(engine, tokenizer, model_name="jaxtrain",
                                      limits=server_lib.Limits(max_tokens=max_len))
    http = server_lib.BackgroundServer(app.app).start()
    try:
      return run_bench(url=http.url, log=log, **kwargs)
    finally:
      http.close()
  finally:
    engine.stop()


def _pow2(n):
  b = 1
  while b < n:
    b *= 2
  return b
