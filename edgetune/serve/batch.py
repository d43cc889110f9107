"""Continuous batching on one base: concurrent requests decode together in one llama.cpp batch.

One llama.cpp context per base, its KV cache shared by all requests; every request is a sequence id. A
worker thread runs the steps: each step takes one *adapter group* (the sequences of one model id —
llama.cpp applies LoRA adapters per context, so one batch is one adapter), puts the next token of
each of its decoding sequences plus a chunk of any prompt still being read into one
``llama_decode``, and samples each sequence's next token from its own sampler chain. Groups take
turns (round robin, a few steps each, since a switch rebuilds the compute graph), so one busy
adapter cannot starve another. A new request joins at the next step; a finished one leaves and its KV stays behind as a *prefix entry*: a later request on
the same adapter that starts with the same tokens (system prompt, tool list, earlier turns) copies
those cells (``llama_memory_seq_cp``) instead of recomputing them. Prefix entries live inside the
fixed KV cache (``n_ctx`` cells) and are dropped least recently used first when a request needs room.

Exactness. A one-request context sums attention over cells 0…n. In the shared cache a sequence's
cells sit among other sequences' cells, and copied prefix cells were computed in another batch shape,
so llama.cpp's vector kernels group the same terms differently and results differ in the last bits
(as llama.cpp's own server notes for its prompt cache). Where the model has two nearly tied tokens a
greedy answer may then go another way, late in the answer. ``parallel: 1`` is the one-at-a-time
path, bit for bit. ``reuse=False`` (``prefix_cache: false``) recomputes every prompt in full.

Sequences never attend to each other (each has its own sequence id), and a sequence's keys and values
are only ever computed while its own adapter is set, so switching adapters between steps is exact.

Samplers are llama-cpp-python's own chain built the way ``Llama.create_completion`` builds it (with
``Llama.create_chat_completion``'s defaults), and text is cut at stop strings the same way.
The request side is :class:`BatchLlama`: it stands in for ``llama_cpp.Llama`` in the chat handlers
(edgetune's and llama-cpp-python's), so chat templates, tools, JSON grammars and thinking work here
exactly as they do in ``edgetune serve MODEL.gguf``.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import queue
import random
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

log = logging.getLogger("edgetune.serve")

MIN_REUSE = 4  # shortest shared prefix (tokens) worth copying from a prefix entry
UTF8_GRACE = 4  # tokens past max_tokens allowed to finish a character cut in half
GROUP_STEPS = 4  # steps an adapter group keeps the turn while others wait (switching costs ~4 ms of graph rebuild)


class RequestError(ValueError):
    """A request the engine cannot take (too long for the context, a grammar llama.cpp rejects)."""


@dataclass
class _Seq:
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    sampler: object  # llama_cpp._internals.LlamaSampler
    stop: list[bytes]
    events: queue.Queue
    cancel: threading.Event
    sid: int = -1
    todo: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    kv: list[int] = field(default_factory=list)  # tokens whose keys/values are in the cache (positions 0..)
    out: list[int] = field(default_factory=list)  # sampled tokens
    last: int | None = None  # sampled, not yet decoded
    buf: bytes = b""
    sent: int = 0  # bytes of buf already sent
    reused: int = 0  # prompt tokens copied from a prefix entry
    t0: float = field(default_factory=time.perf_counter)

    @property
    def need(self) -> int:  # KV cells this sequence may still take
        return len(self.todo) + self.max_tokens + UTF8_GRACE - len(self.out)


class BatchEngine:
    """The worker of one base. ``submit`` is thread-safe; results come back on each request's queue
    as ``("text", str)``, then ``("done", finish_reason, prompt_tokens, completion_tokens, reused)`` or
    ``("error", exception)``."""

    def __init__(self, llm, adapters: dict[str, tuple[object, float]], *, n_ctx: int, parallel: int,
                 n_threads: int, n_batch: int = 512, prefix_entries: int | None = None, request_ctx: int | None = None,
                 reuse: bool = True):
        import llama_cpp
        from llama_cpp import _internals

        self.llm, self.adapters, self.parallel = llm, adapters, parallel
        self.n_ctx, self.n_batch = n_ctx, n_batch  # n_ctx: KV cells shared by all sequences
        self.request_ctx = min(request_ctx or n_ctx, n_ctx)  # the longest one request may be
        self.reuse = reuse  # off: every prompt computed in full, no prefix entries kept
        self.prefix_entries = (parallel if prefix_entries is None else prefix_entries) if reuse else 0
        # the Llama's own settings (flash attention, KV types…: the numbers must match the one-at-a-time path)
        p = type(llm.context_params).from_buffer_copy(llm.context_params)
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_batch, n_batch
        p.n_seq_max = parallel + self.prefix_entries
        # one pool of cells for all sequences: copies are free and a long request may use what short ones
        # leave (per-sequence streams would sum attention exactly as a one-request context does, but
        # llama.cpp then splits every mixed batch by stream: measured slower than one request at a time)
        p.kv_unified = True
        p.n_threads = p.n_threads_batch = n_threads
        self.ctx = _internals.LlamaContext(model=llm._model, params=p, verbose=False)
        self.mem = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.vocab = llm._model.vocab
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.free_ids = list(range(p.n_seq_max))
        self.pending: deque[_Seq] = deque()
        self.active: list[_Seq] = []
        self.entries: OrderedDict[int, tuple[str | None, list[int]]] = OrderedDict()  # sid -> (adapter, tokens)
        self.current: str | None = None
        self.turn = 0
        self.streak = 0  # steps the current group has had in a row
        self.cv = threading.Condition()
        self.stopping = False
        self.stats = {"steps": 0, "batched_tokens": 0, "reused_tokens": 0, "prompt_tokens": 0, "switches": 0}
        self.thread = threading.Thread(target=self._run, name="edgetune-batch", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ request side
    def submit(self, seq: _Seq) -> None:
        with self.cv:
            if self.stopping:
                raise RuntimeError("the engine is stopping")
            self.pending.append(seq)
            self.cv.notify()

    def close(self) -> None:
        import llama_cpp

        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join()
        llama_cpp.llama_batch_free(self.batch)
        self.ctx.close()

    @property
    def busy(self) -> int:
        return len(self.active) + len(self.pending)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.pending and not self.active:
                    self.cv.wait()
                if self.stopping:
                    for s in [*self.active, *self.pending]:
                        s.sampler.close()
                        s.events.put(("error", RuntimeError("the server is unloading this model")))
                    return
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, never the worker
                log.exception("batch step failed")
                for s in self.active:
                    s.events.put(("error", exc))
                    self._drop(s, keep=False)
                self.active = []

    def _admit(self) -> None:
        import llama_cpp

        with self.cv:
            while self.pending and len(self.active) < self.parallel:
                s = self.pending[0]
                if s.cancel.is_set():
                    self.pending.popleft()
                    s.events.put(("done", "cancelled", len(s.prompt), 0, 0))
                    self._drop(s, keep=False)
                    continue
                src, n = self._best_prefix(s)
                need = len(s.prompt) - n + s.max_tokens + UTF8_GRACE
                while self.entries and (self._used() + need > self.n_ctx or not self.free_ids):
                    victim = next(iter(self.entries))
                    if victim == src:  # keep the entry we are about to copy from as long as another can go
                        if len(self.entries) == 1:
                            src, n = None, 0
                            need = len(s.prompt) + s.max_tokens + UTF8_GRACE
                        else:
                            self.entries.move_to_end(victim)
                            victim = next(iter(self.entries))
                    self._forget(victim)
                if self._used() + need > self.n_ctx or not self.free_ids:
                    if not self.active:  # cannot happen for a request within n_ctx; refuse rather than wait forever
                        self.pending.popleft()
                        self._drop(s, keep=False)
                        s.events.put(("error", RequestError(f"the request needs {need} KV cells; the context has {self.n_ctx}")))
                        continue
                    return  # wait for a running sequence to finish
                self.pending.popleft()
                s.sid = self.free_ids.pop()
                if src is not None and n:
                    llama_cpp.llama_memory_seq_cp(self.mem, src, s.sid, 0, n)
                    if src in self.entries:
                        self.entries.move_to_end(src)
                    s.kv, s.reused = list(s.prompt[:n]), n
                    self.stats["reused_tokens"] += n
                s.todo = list(s.prompt[n:])
                self.stats["prompt_tokens"] += len(s.prompt)
                self.active.append(s)

    def _best_prefix(self, s: _Seq) -> tuple[int | None, int]:
        """The prefix entry or running sequence on the same adapter sharing the longest prefix with
        ``s``'s prompt (at most all but its last token: that one's logits are needed)."""
        best, best_n = None, 0
        if not self.reuse:
            return None, 0
        cands = [(sid, a, t) for sid, (a, t) in self.entries.items()] + [(o.sid, o.adapter, o.kv) for o in self.active]
        limit = len(s.prompt) - 1
        for sid, adapter, tokens in cands:
            if adapter != s.adapter:
                continue
            n = 0
            for a, b in zip(tokens, s.prompt[:limit], strict=False):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = sid, n
        return (best, best_n) if best_n >= MIN_REUSE else (None, 0)

    def _used(self) -> int:
        return sum(len(s.kv) + s.need for s in self.active) + sum(len(t) for _a, t in self.entries.values())

    def _forget(self, sid: int) -> None:
        import llama_cpp

        self.entries.pop(sid, None)
        llama_cpp.llama_memory_seq_rm(self.mem, sid, -1, -1)
        self.free_ids.append(sid)

    def _drop(self, s: _Seq, keep: bool) -> None:
        """``s`` leaves the batch; its KV becomes a prefix entry (``keep``) or is freed."""
        s.sampler.close()
        if s.sid < 0:
            return
        if keep and len(s.kv) >= MIN_REUSE and self.prefix_entries > 0:
            while len(self.entries) >= self.prefix_entries:
                self._forget(next(iter(self.entries)))
            self.entries[s.sid] = (s.adapter, s.kv)
        else:
            import llama_cpp

            llama_cpp.llama_memory_seq_rm(self.mem, s.sid, -1, -1)
            self.free_ids.append(s.sid)
        s.sid = -1

    def _use(self, adapter: str | None) -> None:
        import llama_cpp

        if adapter == self.current:
            return
        if adapter is None:
            rc = llama_cpp.llama_set_adapters_lora(self.ctx.ctx, None, 0, None)
        else:
            ptr, scale = self.adapters[adapter]
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(ptr)
            rc = llama_cpp.llama_set_adapters_lora(self.ctx.ctx, arr, 1, (ctypes.c_float * 1)(scale))
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc}) for {adapter!r}")
        self.current = adapter
        self.stats["switches"] += 1

    def _step(self) -> None:
        import llama_cpp

        for s in [s for s in self.active if s.cancel.is_set()]:
            self.active.remove(s)
            s.events.put(("done", "cancelled", len(s.prompt), len(s.out), s.reused))
            self._drop(s, keep=False)
        self._admit()
        if not self.active:
            return
        groups = list(dict.fromkeys(s.adapter for s in self.active))
        if self.current in groups and (len(groups) == 1 or self.streak < GROUP_STEPS):
            adapter = self.current  # a switch costs a graph rebuild: a group keeps the turn for a few steps
            self.streak += 1
        else:
            adapter = groups[self.turn % len(groups)]
            self.turn += 1
            self.streak = 1
        self._use(adapter)
        b = self.batch
        b.n_tokens = 0
        rows: list[tuple[_Seq, int]] = []  # (sequence, batch row whose logits it samples from)

        def put(s: _Seq, tok: int, logits: bool) -> None:
            i = b.n_tokens
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, len(s.kv), 1
            b.seq_id[i][0], b.logits[i] = s.sid, logits
            s.kv.append(tok)
            b.n_tokens += 1
            if logits:
                rows.append((s, i))

        group = [s for s in self.active if s.adapter == adapter]
        for s in group:  # decoding sequences first: one token each
            if not s.todo and s.last is not None:
                put(s, s.last, True)
                s.last = None
        for s in group:  # then prompt chunks, as much as the batch holds
            room = self.n_batch - b.n_tokens
            if s.todo and room > 0:
                chunk, s.todo = s.todo[:room], s.todo[room:]
                for k, tok in enumerate(chunk):
                    put(s, tok, not s.todo and k == len(chunk) - 1)
        if b.n_tokens == 0:
            return
        rc = llama_cpp.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (KV cache full?)")
        self.stats["steps"] += 1
        self.stats["batched_tokens"] += b.n_tokens
        for s, i in rows:
            tok = s.sampler.sample(self.ctx, i)
            self._emit(s, tok)

    def _emit(self, s: _Seq, tok: int) -> None:
        import llama_cpp

        if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
            return self._finish(s, "stop")
        s.out.append(tok)
        s.buf += self.llm.detokenize([tok], prev_tokens=s.prompt + s.out[:-1])
        cut = min((k for k in (s.buf.find(x) for x in s.stop) if k >= 0), default=-1)
        if cut >= 0:
            s.buf = s.buf[:cut]
            return self._finish(s, "stop")
        if len(s.out) >= s.max_tokens and (not _incomplete_utf8(s.buf) or len(s.out) >= s.max_tokens + UTF8_GRACE):
            return self._finish(s, "length")  # never cut a character in half (llama-cpp-python does the same)
        safe = len(s.buf) - max((_partial(s.buf, x) for x in s.stop), default=0)
        safe -= _incomplete_utf8(s.buf[:safe])
        if safe > s.sent:
            s.events.put(("text", s.buf[s.sent:safe].decode("utf-8", errors="ignore")))
            s.sent = safe
        s.last = tok

    def _finish(self, s: _Seq, reason: str) -> None:
        if len(s.buf) > s.sent:
            s.events.put(("text", s.buf[s.sent:].decode("utf-8", errors="ignore")))
        s.events.put(("done", reason, len(s.prompt), len(s.out), s.reused))
        self.active.remove(s)
        self._drop(s, keep=True)


def _partial(buf: bytes, stop: bytes) -> int:
    """Length of the longest end of ``buf`` that is a proper start of ``stop``."""
    for k in range(min(len(stop) - 1, len(buf)), 0, -1):
        if buf.endswith(stop[:k]):
            return k
    return 0


def _incomplete_utf8(buf: bytes) -> int:
    """Bytes at the end of ``buf`` that start a UTF-8 character not yet complete."""
    for k in range(1, min(4, len(buf)) + 1):
        c = buf[-k]
        if c & 0xC0 == 0x80:
            continue  # a continuation byte: look further back
        need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 1
        return k if need > k else 0
    return 0


class BatchLlama:
    """Stands in for ``llama_cpp.Llama`` in a chat handler for one request: everything is the real
    ``Llama`` (tokenizer, metadata, chat template) except ``create_completion``, which runs on the
    batch engine under ``adapter``. ``counts`` holds (prompt, completion, reused) tokens afterwards."""

    def __init__(self, llm, engine: BatchEngine, adapter: str | None, cancel: threading.Event):
        self._llm, self._engine, self._adapter, self._cancel = llm, engine, adapter, cancel
        self.counts = (0, 0, 0)

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def create_chat_completion(self, messages, **kwargs):
        """``Llama.create_chat_completion`` with this object as the llama: the same handler, called with
        the same arguments (every one of that method's defaults, e.g. ``repeat_penalty=1.0``, which
        the handlers' own defaults would otherwise replace)."""
        from llama_cpp import Llama, llama_chat_format

        llm = self._llm
        handler = llm.chat_handler or llm._chat_handlers.get(llm.chat_format) or \
            llama_chat_format.get_chat_completion_handler(llm.chat_format)
        return handler(llama=self, messages=messages, **{**_chat_defaults(Llama), **kwargs})

    def create_completion(self, prompt, suffix=None, max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0, logprobs=None,
                          echo: bool = False, stop=None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                          repeat_penalty: float = 1.0, top_k: int = 40, stream: bool = False, seed: int | None = None,
                          tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model=None, stopping_criteria=None, logits_processor=None, grammar=None, logit_bias=None):
        llm = self._llm
        if logprobs is not None or echo or suffix:
            raise RequestError("logprobs, echo and suffix are not served by the batching team server")
        if logits_processor is not None:
            raise RequestError("logits processors do not run in batched decoding")
        if isinstance(prompt, str):
            tokens = llm.tokenize(prompt.encode("utf-8"), special=True) if prompt else [llm.token_bos()]
        else:
            tokens = list(prompt)
        n_ctx = self._engine.request_ctx
        if len(tokens) >= n_ctx - UTF8_GRACE:
            raise RequestError(f"the prompt is {len(tokens)} tokens; this model's context is {n_ctx}")
        if not max_tokens or max_tokens <= 0 or max_tokens + len(tokens) >= n_ctx - UTF8_GRACE:
            max_tokens = n_ctx - UTF8_GRACE - len(tokens)
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        sampler = make_sampler(llm, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                               repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                               presence_penalty=presence_penalty, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
                               mirostat_eta=mirostat_eta, grammar=grammar, logit_bias=logit_bias,
                               seed=seed if seed is not None else random.randint(0, 2**32 - 1))
        seq = _Seq(tokens, self._adapter, int(max_tokens), sampler, [x.encode("utf-8") for x in stop if x], queue.Queue(),
                   self._cancel)
        self._engine.submit(seq)
        chunks = self._chunks(seq, model or llm.model_path)
        if stream:
            return chunks
        text, finish = [], None
        for c in chunks:
            text.append(c["choices"][0]["text"])
            finish = c["choices"][0]["finish_reason"] or finish
        first = {"id": seq_id(), "created": int(time.time())}
        p, n, _r = self.counts
        return {**first, "object": "text_completion", "model": model or llm.model_path,
                "choices": [{"text": "".join(text), "index": 0, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}}

    def _chunks(self, seq: _Seq, model: str):
        cid, created = seq_id(), int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        while True:
            ev = seq.events.get()
            if ev[0] == "text":
                if ev[1]:
                    yield chunk(ev[1], None)
            elif ev[0] == "error":
                raise ev[1]
            else:
                _, finish, p, n, reused = ev
                self.counts = (p, n, reused)
                yield chunk("", "stop" if finish == "cancelled" else finish)
                return


@functools.cache
def _chat_defaults(llama_cls) -> dict:
    sig = inspect.signature(llama_cls.create_chat_completion)
    return {k: p.default for k, p in sig.parameters.items()
            if k not in ("self", "messages") and p.default is not inspect.Parameter.empty}


def seq_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def make_sampler(llm, *, temperature: float, top_k: int, top_p: float, min_p: float, typical_p: float,
                 repeat_penalty: float, frequency_penalty: float, presence_penalty: float, mirostat_mode: int,
                 mirostat_tau: float, mirostat_eta: float, grammar, logit_bias: dict | None, seed: int):
    """A sampler chain in the order ``Llama.create_completion`` builds its own (logit bias,
    penalties, grammar, then greedy or top-k/typical/top-p/min-p/temperature/dist), so one request
    samples the same tokens here as there. A grammar llama.cpp cannot parse raises :class:`RequestError`."""
    import llama_cpp
    from llama_cpp import _internals

    s = _internals.LlamaSampler()
    try:
        if logit_bias:
            s.add_logit_bias(llm.n_vocab(), {int(k): float(v) for k, v in logit_bias.items()})
        s.add_penalties(n_vocab=llm.n_vocab(), penalty_last_n=llm.last_n_tokens_size, penalty_repeat=repeat_penalty,
                        penalty_freq=frequency_penalty, penalty_present=presence_penalty)
        if grammar is not None:
            g = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar._grammar.encode("utf-8"),
                                                     grammar._root.encode("utf-8"))
            if not g:
                raise RequestError("llama.cpp could not compile the grammar for this request's JSON schema")
            llama_cpp.llama_sampler_chain_add(s.sampler, g)
        if temperature < 0.0:
            s.add_dist(seed)
        elif temperature == 0.0:
            s.add_greedy()
        elif mirostat_mode == 1:
            s.add_mirostat(llm.n_vocab(), seed, mirostat_tau, mirostat_eta, 100)
        elif mirostat_mode == 2:
            s.add_mirostat_v2(seed, mirostat_tau, mirostat_eta)
        else:
            s.add_top_k(top_k)
            s.add_typical(typical_p, 1)
            s.add_top_p(top_p, 1)
            s.add_min_p(min_p, 1)
            s.add_temp(temperature)
            s.add_dist(seed)
    except BaseException:
        s.close()
        raise
    return s


