"""An OpenAI-compatible HTTP server over one continuous-batching `Engine` (FastAPI + uvicorn).

  POST /v1/completions   OpenAI's completions schema, streaming (server-sent events) or not
  GET  /v1/models        the one model served, with a `jaxtrain` field of sizes for benchmarks
  GET  /health           200 {"status": "ok"} while the engine's thread is alive

The engine runs in its own thread; each request is handed to it with callbacks that post its
tokens onto the event loop (`call_soon_threadsafe`), so the HTTP side never blocks on the device.

Input is checked field by field before anything reaches the engine: a bad request gets a 4xx and
`{"error": {"message", "type", "param", "code"}}` naming the field, never a 5xx. Limits: the body
size, the prompt length (and prompt + max_tokens against the cache length) and max_tokens. Only
one prompt per request (a list of several is a 400: send several requests, the engine batches
them). A client that goes away mid-stream cancels its request, which frees its decode slot.

Streams send one `data: {...}` chunk per engine read (the engine decodes `chunk` tokens per
dispatch), then, with `stream_options.include_usage`, a chunk with empty choices and the usage,
then `data: [DONE]`. Text that could be the start of a stop string is held back until it is
known not to be one, so a stop string never leaks into the stream.
"""

import asyncio
import dataclasses
import json
import math
import os
import secrets
import socket
import threading
import time

import fastapi
import uvicorn
from fastapi import responses
from starlette.exceptions import HTTPException as StarletteHTTPException

import jax

from jaxtrain import hardware
from jaxtrain import model as model_lib
from jaxtrain.errors import UserError
from jaxtrain.serving import engine as engine_lib

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 100.0
DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streaming request checks its client is there


@dataclasses.dataclass
class Limits:
  """What one request may ask for. `max_prompt_tokens` and `max_tokens` of None: the engine's
  (its max_prompt_len, and whatever fits in the cache after the prompt)."""
  max_body_bytes: int = 1 << 20
  max_prompt_tokens: int | None = None
  max_tokens: int | None = None
  default_max_tokens: int = 16  # OpenAI's default when a request gives none
  max_waiting: int = 1024  # requests queued beyond the decode slots; more get a 429


class BadRequest(Exception):

  def __init__(self, message, param=None, status=400, kind="invalid_request_error"):
    super().__init__(message)
    self.message, self.param, self.status, self.kind = message, param, status, kind


def error_response(status, message, param=None, kind="invalid_request_error"):
  return responses.JSONResponse(
      {"error": {"message": message, "type": kind, "param": param, "code": None}},
      status_code=status)


def _reject_constant(name):
  raise ValueError(f"{name} is not valid JSON")


def _show(v, n=60):
  """A value for an error message, cut short (and safe for deeply nested ones)."""
  try:
    return json.dumps(v)[:n]
  except (ValueError, RecursionError):
    return type(v).__name__


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
  if not isinstance(v, (int, float)) or isinstance(v, bool):
    return False
  try:
    return math.isfinite(v)
  except OverflowError:  # an integer beyond any float (JSON allows 10**400)
    return False


def model_info(engine):
  """Sizes a benchmark needs for bytes-per-decode-step (exposed by /v1/models)."""
  c = engine.config
  # Bytes of the weights one decode step reads (all but the embedding table, of which only the
  # batch's rows): what the benchmark's bandwidth divides by TPOT.
  param_bytes = model_lib.serving_bytes_per_step(engine.weights, 0)
  n_params = model_lib.param_counts(c)["total"]
  kv = engine.state.cache.ks_BKSH[0]  # one [B, K, S, H] buffer per layer
  kv_bytes_per_token = 2 * c.n_layers * c.kv_heads * c.dim_per_head * kv.dtype.itemsize
  device = jax.devices()[0]
  return {"parameters": n_params, "param_bytes": param_bytes,
          "kv_bytes_per_token": kv_bytes_per_token, "kv_dtype": str(kv.dtype),
          "vocab_size": c.vocab_size, "slots": engine.slots, "max_len": engine.max_len,
          "max_prompt_len": engine.max_prompt_len, "chunk": engine.chunk,
          "device_kind": device.device_kind, "platform": device.platform,
          "device_bandwidth_gbs": hardware.device_bandwidth_gbs(device)}


class CompletionServer:
  """The FastAPI app over a started engine (`app`), and the request validation it uses."""

  def __init__(self, engine, tokenizer=None, *, model_name="jaxtrain", limits=None):
    self.engine = engine
    self.tokenizer = tokenizer
    self.model_name = model_name
    self.limits = limits or Limits()
    self.max_prompt_tokens = min(self.limits.max_prompt_tokens or engine.max_prompt_len,
                                 engine.max_prompt_len)
    self.info = model_info(engine)
    self.created = int(time.time())
    self.app = self._make_app()

  # -- validation ----------------------------------------------------------------------------

  def parse(self, body):
    """A validated `engine.Request` (without callbacks) and the stream options, or BadRequest."""
    try:
      req = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
      raise BadRequest(f"the body is not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(req, dict):
      raise BadRequest("the body must be a JSON object")

    def get(name, check, what, default=None):
      v = req.get(name)
      if v is None:
        return default
      if not check(v):
        raise BadRequest(f"'{name}' must be {what}, got {_show(v)}", name)
      return v

    model = get("model", lambda v: isinstance(v, str), "a string")
    if model is not None and model != self.model_name:
      raise BadRequest(f"model '{model[:80]}' does not exist: this server serves "
                       f"'{self.model_name}'", "model", 404, "not_found_error")
    prompt = self._prompt(req)
    max_tokens = get("max_tokens", _is_int, "an integer", self.limits.default_max_tokens)
    room = self.engine.max_len - len(prompt)
    limit = min(self.limits.max_tokens or room, room)
    if max_tokens < 1:
      raise BadRequest(f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
    if self.limits.max_tokens and max_tokens > self.limits.max_tokens:
      raise BadRequest(f"'max_tokens' is {max_tokens}, more than this server's limit of "
                       f"{self.limits.max_tokens}", "max_tokens")
    if max_tokens > limit:
      raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                       f"context of {self.engine.max_len} tokens", "max_tokens")
    temperature = get("temperature", _is_number, "a number", 1.0)
    if not 0 <= temperature <= MAX_TEMPERATURE:
      raise BadRequest(f"'temperature' must be in [0, {MAX_TEMPERATURE:g}], got {temperature}",
                       "temperature")
    top_p = get("top_p", _is_number, "a number", 1.0)
    if not 0 < top_p <= 1:
      raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = get("top_k", _is_int, "an integer", 0)
    if top_k < -1:
      raise BadRequest(f"'top_k' must be >= 0 (or -1: off), got {top_k}", "top_k")
    top_k = max(top_k, 0)
    seed = get("seed", _is_int, "an integer", None)
    if seed is not None and abs(seed) >= 2 ** 63:
      raise BadRequest("'seed' must fit in 64 bits", "seed")
    seed = secrets.randbits(31) if seed is None else seed % (2 ** 31)
    stop = req.get("stop")
    if stop is None:
      stop = []
    elif isinstance(stop, str):
      stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
      raise BadRequest("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
      raise BadRequest(f"'stop': at most {MAX_STOP_STRINGS} strings of at most "
                       f"{MAX_STOP_CHARS} characters", "stop")
    if stop and self.tokenizer is None:
      raise BadRequest("'stop' needs a tokenizer and this model has none", "stop")
    stream = get("stream", lambda v: isinstance(v, bool), "true or false", False)
    options = get("stream_options", lambda v: isinstance(v, dict), "an object", {})
    if options and not stream:
      raise BadRequest("'stream_options' is only allowed with stream: true", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
      raise BadRequest("'stream_options.include_usage' must be true or false",
                       "stream_options.include_usage")
    ignore_eos = get("ignore_eos", lambda v: isinstance(v, bool), "true or false", False)
    # Fields we do not implement are refused unless they ask for the default.
    for name, default in (("n", 1), ("best_of", 1), ("echo", False), ("logprobs", None),
                          ("suffix", None), ("presence_penalty", 0), ("frequency_penalty", 0)):
      v = req.get(name)
      if v is not None and not (v == default and isinstance(v, bool) == isinstance(default, bool)):
        raise BadRequest(f"'{name}' = {_show(v, 40)} is not supported by this server "
                         f"(only {json.dumps(default)})", name)
    if req.get("logit_bias") not in (None, {}):
      raise BadRequest("'logit_bias' is not supported by this server", "logit_bias")
    eos = None
    if not ignore_eos and self.tokenizer is not None:
      eos = self.tokenizer.eos_id
    request = engine_lib.Request(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stop),
                                 eos_id=eos)
    try:
      self.engine.check(request)
    except UserError as e:
      raise BadRequest(str(e)) from None
    return request, stream, include_usage

  def _prompt(self, req):
    if "prompt" not in req or req["prompt"] is None:
      raise BadRequest("'prompt' is required", "prompt")
    prompt = req["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
      prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
      raise BadRequest("several prompts in one request are not supported: send one request per "
                       "prompt (the server batches them)", "prompt")
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise BadRequest("this model has no tokenizer: send the prompt as a list of token ids",
                         "prompt")
      if len(prompt) > 8 * self.limits.max_body_bytes:
        raise BadRequest("'prompt' is too long", "prompt")
      try:
        ids = list(self.tokenizer.encode(prompt))
      except Exception:  # pylint: disable=broad-except  (e.g. a lone surrogate in the JSON)
        raise BadRequest("'prompt' could not be tokenized", "prompt") from None
      bos = self.tokenizer.bos_id
      if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    elif isinstance(prompt, list):
      V = self.engine.config.vocab_size
      if not all(_is_int(t) and 0 <= t < V for t in prompt):
        raise BadRequest(f"'prompt' as token ids must be integers in [0, {V})", "prompt")
      ids = list(prompt)
    else:
      raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")
    if not ids:
      raise BadRequest("'prompt' is empty", "prompt")
    if len(ids) > self.max_prompt_tokens:
      raise BadRequest(f"'prompt' has {len(ids)} tokens, more than this server's limit of "
                       f"{self.max_prompt_tokens}", "prompt")
    return ids

  # -- the app -------------------------------------------------------------------------------

  def _make_app(self):
    app = fastapi.FastAPI(title="jaxtrain", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc):  # 404 for unknown paths, 405 for wrong methods
      return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(_, exc):
      return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")

    @app.get("/health")
    async def health():
      thread = self.engine._thread  # pylint: disable=protected-access
      if thread is not None and not thread.is_alive():
        return error_response(503, "the engine has stopped", kind="server_error")
      return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
      return {"object": "list", "data": [{
          "id": self.model_name, "object": "model", "created": self.created,
          "owned_by": "jaxtrain", "max_model_len": self.engine.max_len,
          "jaxtrain": self.info}]}

    @app.post("/v1/completions")
    async def completions(http: fastapi.Request):
      try:
        body = await self._read_body(http)
        request, stream, include_usage = self.parse(body)
        with self.engine._lock:  # pylint: disable=protected-access  (cancelled ones never run)
          waiting = sum(not r.cancelled for r in self.engine.waiting)
        if waiting >= self.limits.max_waiting:
          raise BadRequest(f"{waiting} requests are already waiting: try again later", None,
                           429, "rate_limit_error")
      except BadRequest as e:
        return error_response(e.status, e.message, e.param, e.kind)
      return await (self._stream(request, include_usage) if stream else
                    self._complete(request, http))

    return app

  async def _read_body(self, http):
    limit = self.limits.max_body_bytes
    length = http.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
      raise BadRequest(f"the body is larger than this server's limit of {limit} bytes", None, 413)
    chunks, size = [], 0
    async for chunk in http.stream():
      size += len(chunk)
      if size > limit:
        raise BadRequest(f"the body is larger than this server's limit of {limit} bytes", None,
                         413)
      chunks.append(chunk)
    return b"".join(chunks)

  def _submit(self, request):
    """Hand a request to the engine; returns an asyncio.Queue of ("tokens", text, new ids,
    finish_reason or None) and ("done",) events posted from the engine's thread."""
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()

    def post(item):
      try:
        loop.call_soon_threadsafe(events.put_nowait, item)
      except RuntimeError:  # the loop is gone (shutting down): nobody is listening
        pass

    request.on_tokens = lambda r, new: post(("tokens", r.text, list(new), r.finish_reason))
    request.on_done = lambda r: post(("done",))
    self.engine.submit(request)
    return events

  def _body(self, rid, choices, **extra):
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices, **extra}

  def _usage(self, request):
    n, m = len(request.prompt), len(request.tokens)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

  async def _complete(self, request, http):
    """Wait for the whole completion. A client that hangs up (or times out) meanwhile cancels
    it: Starlette does not cancel a plain endpoint when its client leaves, so the wait also
    watches the connection, or the request would hold its slot until max_tokens."""
    events = self._submit(request)
    done = asyncio.ensure_future(self._until_done(events))
    try:
      while not done.done():
        await asyncio.wait([done], timeout=DISCONNECT_POLL_SECONDS)
        if not done.done() and await http.is_disconnected():
          break
    finally:
      done.cancel()
      if request.finish_reason is None:  # the client went away
        self.engine.cancel(request)
    if request.finish_reason == "error":
      return error_response(500, f"generation failed: {request.error}", kind="server_error")
    choice = {"index": 0, "text": request.text, "finish_reason": request.finish_reason,
              "logprobs": None}
    if self.tokenizer is None:
      choice["token_ids"] = list(request.tokens)
    return self._body(f"cmpl-{request.id}", [choice], usage=self._usage(request))

  @staticmethod
  async def _until_done(events):
    while (await events.get())[0] != "done":
      pass

  async def _stream(self, request, include_usage):
    events = self._submit(request)
    rid = f"cmpl-{request.id}"
    usage = {"usage": None} if include_usage else {}

    def chunk(text, reason=None, ids=None):
      choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
      if ids is not None:
        choice["token_ids"] = ids
      return f"data: {json.dumps(self._body(rid, [choice], **usage))}\n\n"

    async def sse():
      sent = 0
      try:
        while True:
          event = await events.get()
          if event[0] == "done":
            break
          _, text, ids, reason = event
          ids = ids if self.tokenizer is None else None
          if reason is not None:  # the last tokens: everything left, with the finish reason
            if reason != "error":
              yield chunk(text[sent:], reason, ids)
            break
          safe = len(text) - _held_back(text, request.stop)
          if safe > sent or ids:
            yield chunk(text[sent:safe], ids=ids)
            sent = max(sent, safe)
        if request.finish_reason == "error":
          error = {"message": f"generation failed: {request.error}", "type": "server_error",
                   "param": None, "code": None}
          yield f"data: {json.dumps({'error': error})}\n\n"
        else:
          if include_usage:
            yield f"data: {json.dumps(self._body(rid, [], usage=self._usage(request)))}\n\n"
        yield "data: [DONE]\n\n"
      finally:
        if request.finish_reason is None:  # the client went away mid-stream
          self.engine.cancel(request)

    return responses.StreamingResponse(sse(), media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache"})


def _held_back(text, stops):
  """How many characters at the end of `text` to hold back: an undecodable tail (a partial
  UTF-8 character decodes as U+FFFD) or the longest suffix that starts some stop string."""
  n = 0
  while n < len(text) and text[len(text) - 1 - n] == "\ufffd" and n < 4:
    n += 1
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), 0, -1):
      if text.endswith(s[:k]):
        n = max(n, k)
        break
  return n


# -- running it -------------------------------------------------------------------------------


def make_engine(model, tokenizer=None, *, slots=8, max_len=None, chunk=8, max_prompt_tokens=None,
                warmup=True, log=None):
  """A started engine, compiled for every prompt bucket it can see (so no request compiles)."""
  from jaxtrain.serving import generate as gen  # pylint: disable=import-outside-toplevel
  max_len = int(max_len or model.config.max_seq_len)
  if max_len > model.config.max_seq_len:
    raise UserError(f"--max-len={max_len} is longer than the model's context of "
                    f"{model.config.max_seq_len}")
  engine = engine_lib.Engine(model, tokenizer, slots=slots, max_len=max_len, chunk=chunk,
                             max_prompt_len=min(max_prompt_tokens or max_len // 2, max_len - 1))
  if warmup:
    start = time.perf_counter()
    lens, b = [], gen.MIN_BUCKET
    while True:
      lens.append(min(b, engine.max_prompt_len))
      if b >= engine.max_prompt_len:
        break
      b *= 2
    engine.warmup(prompt_lens=lens)
    if log:
      rows = "/".join(map(str, engine.warm_rows))
      log(f"compiled prefill for prompt buckets up to {lens[-1]} tokens and decode for "
          f"{rows} of {engine.slots} slots in {time.perf_counter() - start:.1f}s")
  return engine.start()


def bound_socket(host="127.0.0.1", port=0):
  """A socket bound to host:port (port 0: a free one), handed to uvicorn; UserError if taken."""
  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except (OSError, OverflowError) as e:
    sock.close()
    why = getattr(e, "strerror", None) or e
    raise UserError(f"cannot listen on {host}:{port}: {why}") from None
  sock.listen(2048)  # connections queue from here on, before uvicorn takes the socket
  return sock


class BackgroundServer:
  """Uvicorn serving `app` in a thread, on a free port of 127.0.0.1 (tests, bench --workdir)."""

  def __init__(self, app, host="127.0.0.1", port=0, log_level="warning"):
    sock = bound_socket(host, port)
    self.host, self.port = sock.getsockname()[:2]
    self.url = f"http://{self.host}:{self.port}"
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30)
    self.server = uvicorn.Server(config)
    self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                    name="jaxtrain-http", daemon=True)
    self._sock = sock

  def start(self, timeout=30):
    self._thread.start()
    deadline = time.monotonic() + timeout
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError("the HTTP server did not start")
      time.sleep(0.02)
    return self

  def close(self):
    self.server.should_exit = True
    self._thread.join(timeout=10)
    self._sock.close()


def serve(workdir, *, host="127.0.0.1", port=8000, slots=8, max_len=None, chunk=8, step=None,
          model_name=None, limits=None, log=print):
  """Load a model, compile, and serve it until interrupted (the `jaxtrain serve` verb)."""
  import jaxtrain  # pylint: disable=import-outside-toplevel
  limits = limits or Limits()
  sock = bound_socket(host, port)  # a taken port is bad input: say so before loading anything
  try:
    model, tokenizer = jaxtrain.load_model(workdir, step=step)
    engine = make_engine(model, tokenizer, slots=slots, max_len=max_len, chunk=chunk,
                         max_prompt_tokens=limits.max_prompt_tokens, log=log)
    try:
      name = model_name or os.path.basename(os.path.normpath(workdir))
      server = CompletionServer(engine, tokenizer, model_name=name, limits=limits)
      log(f"ready: model '{name}' on http://{host}:{sock.getsockname()[1]}/v1 ({engine.slots} "
          f"slots, context {engine.max_len}, prompts up to {server.max_prompt_tokens} tokens); "
          "Ctrl-C stops")
      config = uvicorn.Config(server.app, log_level="info", timeout_keep_alive=30)
      try:
        uvicorn.Server(config).run(sockets=[sock])
      except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C
        log("stopped")
    finally:
      engine.stop()
  finally:
    sock.close()
