"""Continuous batching over fixed decode slots.

The engine owns one `DecodeState` of `slots` rows and a cache of `max_len` positions. Every
iteration it (1) prefills waiting requests into free slots (one request per prefill call, its
prompt padded to a power-of-two bucket) and inserts them, (2) dispatches the next decode chunk of
`chunk` steps, and only then (3) reads the previous chunk's tokens and hands them to their
requests, so the device is never idle while the host looks at tokens. A request whose tokens
end (EOS, a stop string, max_tokens, or the end of the cache) frees its slot; a waiting one
takes it (the lowest free slot) in the next iteration while the others keep decoding. After
`warmup`, a chunk computes only the slots up to the highest occupied one (`model.decode_rows`;
on CPU rounded up to a power of two), so one user of an 8-slot server decodes as a 1-row batch.

Because tokens are read one chunk late, a chunk may run for a request that has just finished;
its tokens are ignored (each chunk remembers which request sat in which slot when it was
dispatched).

`cancel` (a client that went away) marks a request; the engine finishes it ("cancelled") at its
next look, so it frees its slot, or never takes one if it was still waiting.
"""

import collections
import dataclasses
import itertools
import threading
import time

import numpy as np

from jaxtrain import model as model_lib
from jaxtrain.errors import UserError
from jaxtrain.serving import generate as gen


CONTEXT_TOKENS = 4  # prompt tokens decoded before a completion's (`Engine._text`)


@dataclasses.dataclass
class Request:
  """One completion request. `on_tokens(request, new_ids)` and `on_done(request)` are called
  from the engine's thread (when it has one)."""
  prompt: list
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple = ()
  eos_id: int | None = None
  on_tokens: object = None
  on_done: object = None
  # Filled by the engine.
  id: int = -1
  tokens: list = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: str | None = None
  submitted: float = 0.0
  first_token_time: float | None = None
  done_time: float | None = None
  error: str | None = None
  cancelled: bool = False  # set by Engine.cancel: the engine frees its slot and finishes it
  _event: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

  def wait(self, timeout=None):
    if not self._event.wait(timeout):
      raise TimeoutError(f"request {self.id} not finished after {timeout}s")
    return self


class Engine:
  """Continuous batching for one model. `submit` from any thread; `run_until_idle` (caller's
  thread) or `start` (a background thread) drives it."""

  _ids = itertools.count()

  def __init__(self, model, tokenizer=None, *, slots=4, max_len=None, chunk=8,
               max_prompt_len=None):
    c = model.config
    self.config = c
    self.weights = model_lib.serving_weights(model)
    self.tokenizer = tokenizer
    self.slots = int(slots)
    self.max_len = int(max_len or c.max_seq_len)
    self.chunk = int(chunk)
    self.max_prompt_len = int(max_prompt_len or self.max_len // 2)
    if self.slots < 1 or self.chunk < 1 or self.max_len < 2:
      raise UserError("engine needs slots >= 1, chunk >= 1 and max_len >= 2")
    self.state = gen.DecodeState.empty(c, self.slots, self.max_len)
    self.active = [None] * self.slots  # the request in each slot
    self.waiting = collections.deque()
    self._lock = threading.Lock()
    self._wake = threading.Event()
    self._pending = None  # (tokens [steps, rows] device array, slot owners when dispatched)
    self._admitting = None  # the request being prefilled
    self._thread = None
    self._stop = False
    self.warm_rows = ()  # the row counts `warmup` compiled decode for; others decode all slots

  # -- requests ---------------------------------------------------------------------------

  def check(self, request):
    """Raise UserError for a request this engine cannot serve (before it is queued)."""
    n = len(request.prompt)
    if n < 1:
      raise UserError("prompt is empty")
    if n > self.max_prompt_len:
      raise UserError(f"prompt has {n} tokens, more than this server's {self.max_prompt_len}")
    if request.max_tokens < 1:
      raise UserError(f"max_tokens must be >= 1, got {request.max_tokens}")
    if n + request.max_tokens > self.max_len:
      raise UserError(f"prompt ({n} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                      f"context of {self.max_len}")
    V = self.config.vocab_size
    if any((not isinstance(t, (int, np.integer))) or t < 0 or t >= V for t in request.prompt):
      raise UserError(f"prompt token ids must be integers in [0, {V})")
    if request.temperature < 0 or not 0 < request.top_p <= 1 or request.top_k < 0:
      raise UserError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")

  def submit(self, request):
    self.check(request)
    request.id = next(self._ids)
    request.submitted = time.perf_counter()
    with self._lock:
      self.waiting.append(request)
    self._wake.set()
    return request

  def cancel(self, request):
    """Stop a request (its client went away): it finishes with finish_reason "cancelled" at the
    engine's next look at it, freeing its slot; a waiting one never takes one."""
    request.cancelled = True
    self._wake.set()

  # -- the loop ---------------------------------------------------------------------------

  def _admit(self):
    for slot in range(self.slots):
      if self.active[slot] is not None:
        continue
      request = None
      while request is None:  # the next request not cancelled while it waited
        with self._lock:
          if not self.waiting:
            return
          request = self.waiting.popleft()
        if request.cancelled:  # its client left while it waited: finish it, take the next
          self._emit(request, [])
          request = None
      self._admitting = request  # neither waiting nor active: `_fail_all` must still see it
      n = len(request.prompt)
      T = min(gen.bucket(n), self.max_len)
      tokens = np.zeros((1, T), np.int32)
      tokens[0, :n] = request.prompt
      try:  # the engine's state is untouched until insert: a failure here is this request's
        sampling = gen.Sampling.make([request.temperature],
                                     [min(request.top_k, self.config.vocab_size)],
                                     [request.top_p], [request.seed])
        first, prefix = gen.prefill(self.config, self.weights, tokens, np.array([n], np.int32),
                                    sampling)
      except Exception as e:  # pylint: disable=broad-except
        self._admitting = None
        _finish_with_error(request, f"{type(e).__name__}: {e}")
        continue
      self.state = gen.insert(self.state, prefix, first, sampling, slot)
      self.active[slot] = request
      self._admitting = None
      self._emit(request, [int(first[0])])

  def _emit(self, request, ids):
    """Append generated ids to a request, stopping where it must; True if it finished."""
    if request.finish_reason is not None:
      return True
    now = time.perf_counter()
    if request.first_token_time is None and ids:
      request.first_token_time = now
    new = []
    reason = "cancelled" if request.cancelled else None
    for t in ([] if reason else ids):
      if request.eos_id is not None and t == request.eos_id:
        reason = "stop"
        break
      new.append(t)
      if len(request.tokens) + len(new) >= request.max_tokens:
        reason = "length"
        break
    if new:
      request.tokens.extend(new)
    if self.tokenizer is not None:
      text = self._text(request, request.tokens)
      cuts = [cut for cut in (text.find(s) for s in request.stop) if cut >= 0]
      if cuts:  # the earliest stop string in the text, whichever its place in the list
        cut = min(cuts)
        text, reason = text[:cut], "stop"
        # Keep the tokens consistent with the text: drop those past the cut.
        while request.tokens and len(self._text(request, request.tokens)) > cut:
          request.tokens.pop()
      request.text = text
    if reason is None and len(request.prompt) + len(request.tokens) >= self.max_len:
      reason = "length"
    if reason is not None:  # before on_tokens, so a stream can send its last chunk with it
      request.finish_reason = reason
      request.done_time = now
    if request.on_tokens is not None and (new or reason):
      request.on_tokens(request, new)
    if reason is not None:
      if request.on_done is not None:
        request.on_done(request)
      request._event.set()  # pylint: disable=protected-access
      return True
    return False

  def _text(self, request, tokens):
    """The text `tokens` add after the prompt. Decoding them alone would lose what depends on
    the tokens before (SentencePiece drops the space a first piece "▁world" starts with), so
    they are decoded after the prompt's last few tokens, whose own text is then cut off."""
    context = list(request.prompt[-CONTEXT_TOKENS:])
    head = self.tokenizer.decode(context)
    whole = self.tokenizer.decode(context + list(tokens))
    return whole[len(head):] if whole.startswith(head) else self.tokenizer.decode(tokens)

  def _consume(self, pending):
    tokens_SB, owners = pending
    tokens_BS = np.asarray(tokens_SB).T
    for slot, request in enumerate(owners):
      if request is None or request.finish_reason is not None:
        continue
      if self._emit(request, tokens_BS[slot].tolist()) and self.active[slot] is request:
        self._free(slot)

  def _free(self, slot):
    self.active[slot] = None
    self.state = gen.release(self.state, slot)

  def step(self):
    """One iteration: admit, dispatch a chunk, consume the previous chunk. False when idle."""
    self._admit()
    live = [slot for slot, r in enumerate(self.active) if r is not None and r.finish_reason is None]
    previous, self._pending = self._pending, None
    if live:
      rows = min((r for r in self.warm_rows if r > live[-1]), default=self.slots)
      self.state, tokens_SB = gen.decode(self.config, self.weights, self.state, self.chunk, rows)
      self._pending = (tokens_SB, self.active[:rows])
    # Requests finished by their prefill token free their slot without a decode.
    for slot, request in enumerate(self.active):
      if request is not None and request.finish_reason is not None:
        self._free(slot)
    if previous is not None:
      self._consume(previous)
    with self._lock:
      return bool(self._pending is not None or self.waiting
                  or any(r is not None for r in self.active))

  def run_until_idle(self):
    while self.step():
      pass

  def warmup(self, prompt_lens=(1,)):
    """Compile prefill for these prompt lengths' buckets, insert, and decode for every number of
    rows a step may compute (`model.decode_rows`); from then on a chunk computes only the slots
    up to the highest occupied one. Call it before serving: the extra decode chunks run on
    empty slots. Without it (`generate`) every chunk decodes all slots, so a batch whose rows
    finish at different times never waits for a compilation."""
    for n in prompt_lens:
      self.submit(Request(prompt=[0] * n, max_tokens=2))
    self.run_until_idle()
    rows = sorted({model_lib.decode_rows(n, self.slots) for n in range(1, self.slots + 1)})
    for r in rows:
      self.state, tokens_SB = gen.decode(self.config, self.weights, self.state, self.chunk, r)
      tokens_SB.block_until_ready()
    self.warm_rows = tuple(rows)

  # -- background thread (the server) -------------------------------------------------------

  def start(self):
    self._stop = False
    self._thread = threading.Thread(target=self._loop, name="jaxtrain-engine", daemon=True)
    self._thread.start()
    return self

  def _loop(self):
    while not self._stop:
      try:
        busy = self.step()
      except Exception as e:  # pylint: disable=broad-except
        self._fail_all(f"{type(e).__name__}: {e}")
        busy = False
      if not busy:
        self._wake.wait(0.05)
        self._wake.clear()

  def _fail_all(self, message):
    with self._lock:
      victims = ([r for r in self.active if r is not None] + [self._admitting] +
                 list(self.waiting))
      self.waiting.clear()
    self.active = [None] * self.slots
    self._pending = self._admitting = None
    self.state = gen.DecodeState.empty(self.config, self.slots, self.max_len)
    for r in victims:
      if r is not None:
        _finish_with_error(r, message)

  def stop(self):
    self._stop = True
    self._wake.set()
    if self._thread is not None:
      self._thread.join(timeout=10)


def _finish_with_error(request, message):
  if request.finish_reason is None:
    request.error, request.finish_reason = message, "error"
    request.done_time = time.perf_counter()
    if request.on_done is not None:
      request.on_done(request)
    request._event.set()  # pylint: disable=protected-access


def generate(model, prompts, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=0,
             tokenizer=None, stop=(), slots=None, chunk=8):
  """Completions of `prompts` (lists of token ids, or strings with a `tokenizer`).

  Returns one `Request` per prompt with `.tokens` (the new ids), `.text` (with a tokenizer) and
  `.finish_reason` ("stop" at EOS or a stop string, "length" at max_new_tokens). Prompt i is
  sampled with seed (seed, i), so its output does not depend on the other prompts.
  """
  if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], (int, np.integer))):
    prompts = [prompts]
  ids = []
  for p in prompts:
    if isinstance(p, str):
      if tokenizer is None:
        raise UserError("string prompts need a tokenizer (tokenizer=...)")
      p = tokenizer.encode(p)
      if tokenizer.bos_id is not None and (not p or p[0] != tokenizer.bos_id):
        p = [tokenizer.bos_id] + p
    ids.append([int(t) for t in p])
  if not ids:
    return []
  longest = max(len(p) for p in ids)
  limit = model.config.max_seq_len
  if longest + max_new_tokens > limit:
    raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                    f"model's max_seq_len of {limit}")
  max_len = min(gen.bucket(longest + max_new_tokens), limit)
  engine = Engine(model, tokenizer, slots=slots or len(ids), max_len=max_len, chunk=chunk,
                  max_prompt_len=max_len)
  eos = tokenizer.eos_id if tokenizer is not None else None
  requests = [engine.submit(Request(prompt=p, max_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=_request_seed(seed, i),
                                    stop=tuple(stop), eos_id=eos))
              for i, p in enumerate(ids)]
  engine.run_until_idle()
  return requests


def _request_seed(seed, i):
  return (int(seed) * 1_000_003 + i) % (2 ** 31)
