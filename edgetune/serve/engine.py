"""Loaded bases, per-request LoRA switching, the bounded queue, and the one generation function.

One ``llama_cpp.Llama`` per base. Its adapters are loaded once with llama.cpp's
``llama_adapter_lora_init`` and switched per request with ``llama_set_adapters_lora`` on the one
context, so memory grows by the adapters' size, not by a model per adapter (llama-cpp-python's
high-level ``Llama`` takes one ``lora_path`` at load time; the low-level calls are what switch).

A base runs ``parallel`` requests at a time: decoded together in one batch by
:mod:`edgetune.serve.batch` (continuous batching), or one at a time on the ``Llama``'s own context when
``parallel`` is 1. Others wait in a bounded queue: past ``queue_depth`` waiting, or after ``queue_timeout`` seconds of waiting, the
request is refused with :class:`Overloaded` (the app answers 503 + Retry-After). Shadow runs
(``background=True``) wait in a queue of their own with the same bound: they never take a client's
place in the queue, and past the bound they are dropped (logged), never answered 503 to anyone.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..errors import EdgetuneError
from .team_config import BaseSpec, TeamConfig

log = logging.getLogger("edgetune.serve")


class Overloaded(Exception):
    """No turn for this request now; ``retry_after`` seconds is a fair guess for the client."""

    def __init__(self, reason: str, retry_after: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class BadRequest(ValueError):
    """A request the server cannot take as sent (answered 400 with this text)."""


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # generation time (after the request's turn came)
    cancelled: bool = False
    reasoning: str | None = None  # a thinking template's reasoning, apart from the answer (``text``)
    tool_calls: list[dict] | None = None  # OpenAI tool_calls the model made


class _TokenProbe:
    """A logits processor that counts tokens and ends generation when ``cancel`` is set (it
    leaves only end-of-generation possible, so llama.cpp stops at the next token)."""

    def __init__(self, eos: int, cancel: threading.Event):
        self.eos, self.cancel = eos, cancel
        self.prompt_tokens = self.calls = 0

    def __call__(self, input_ids, scores):
        if self.calls == 0:
            self.prompt_tokens = len(input_ids)
        self.calls += 1
        if self.cancel.is_set():
            import numpy as np

            scores[:] = -np.inf
            scores[self.eos] = 0.0
        return scores


GEN_KEYS = ("temperature", "top_p", "top_k", "min_p", "stop", "seed", "presence_penalty", "frequency_penalty",
            "repeat_penalty", "logit_bias")
CHAT_KEYS = ("tools", "tool_choice", "functions", "function_call", "response_format")


def _params(body: dict, keys: tuple[str, ...]) -> dict:
    params = {k: body[k] for k in keys if body.get(k) is not None}
    params.setdefault("temperature", 1.0)  # the OpenAI default (llama-cpp-python's own is 0.2)
    return params


def _max_tokens(body: dict, default: int = 256) -> int:
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or default)


def run_chat(llm, body: dict, cancel: threading.Event, on_delta: Callable[[dict], None] | None = None) -> Completion:
    """The request → prompt → completion path: ``body`` (an OpenAI chat request) rendered with the
    GGUF's own chat template through edgetune's chat handler (tools, JSON schemas, thinking), generated
    on ``llm``: a ``Llama`` with the adapter already set, or a :class:`~edgetune.serve.batch.BatchLlama`.

    Each streamed delta goes to ``on_delta`` as it comes (``{"content": …}``, ``{"reasoning_content": …}``
    or ``{"tool_calls": […]}``). ``cancel`` stops generation at the next token.
    """
    from ..reasoning import REQUEST_THINK, request_think

    token = REQUEST_THINK.set(request_think(body))
    try:
        return _generate(llm, cancel, on_delta, chat=body)
    finally:
        REQUEST_THINK.reset(token)


def run_text(llm, body: dict, cancel: threading.Event, on_delta: Callable[[dict], None] | None = None) -> Completion:
    """``/v1/completions``: ``body["prompt"]`` (one string) continued as it is, no chat template."""
    return _generate(llm, cancel, on_delta, text=body)


def _generate(llm, cancel, on_delta, *, chat: dict | None = None, text: dict | None = None) -> Completion:
    from llama_cpp import LogitsProcessorList

    from .batch import BatchLlama

    batched = isinstance(llm, BatchLlama)
    probe = None if batched else _TokenProbe(llm.token_eos(), cancel)
    extra = {} if batched else {"logits_processor": LogitsProcessorList([probe])}
    pieces, why, calls, finish = [], [], [], "stop"
    t0 = time.perf_counter()
    if chat is not None:
        stream = llm.create_chat_completion(messages=chat["messages"], max_tokens=_max_tokens(chat), stream=True,
                                            **_params(chat, GEN_KEYS + CHAT_KEYS), **extra)
    else:
        stream = llm.create_completion(prompt=text["prompt"], max_tokens=_max_tokens(text, 16), stream=True,
                                       **_params(text, GEN_KEYS), **extra)
    for chunk in stream:
        choice = chunk["choices"][0]
        delta = choice.get("delta") if chat is not None else {"text": choice.get("text")}
        for key, into in (("reasoning_content", why), ("content", pieces), ("text", pieces)):
            piece = delta.get(key) or ""
            if piece:
                into.append(piece)
                if on_delta is not None:
                    on_delta({key: piece})
        if delta.get("tool_calls"):
            calls += [{k: v for k, v in c.items() if k != "index"} for c in delta["tool_calls"]]
            if on_delta is not None:
                on_delta({"tool_calls": delta["tool_calls"]})
        if choice.get("finish_reason"):
            finish = choice["finish_reason"]
        if cancel.is_set() and not batched:
            break
    n_prompt, n_out = (llm.counts[0], llm.counts[1]) if batched else (probe.prompt_tokens, probe.calls)
    return Completion("".join(pieces), finish, n_prompt, n_out, time.perf_counter() - t0, cancel.is_set(),
                      "".join(why) or None, calls or None)


@dataclass
class LoadedBase:
    """One base GGUF in memory with its adapters; ``turn`` admits ``spec.parallel`` requests at a time.

    ``parallel`` 1: one request at a time on the ``Llama``'s own context (the adapter switched per
    request). More: a :class:`~edgetune.serve.batch.BatchEngine` decodes the admitted requests together.
    """

    spec: BaseSpec
    n_threads: int
    llm: object = None
    engine: object = None  # BatchEngine when spec.parallel > 1
    adapters: dict = field(default_factory=dict)  # name → llama_adapter_lora_p
    current: str | None = None
    waiting: int = 0  # client requests waiting for a turn
    waiting_background: int = 0  # shadow runs waiting (bounded separately: they never fill a client's place)
    running: int = 0
    last_used: float = 0.0
    turn: asyncio.Semaphore = None
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loaded_path: object = None  # the GGUF loaded (a registry-backed base's path moves with its alias)
    checked: float = 0.0  # when the registry alias was last looked at

    def __post_init__(self):
        self.turn = asyncio.Semaphore(self.batching and self.spec.parallel or 1)

    @property
    def batching(self) -> bool:
        return self.spec.parallel > 1

    @property
    def size_mb(self) -> float:
        return (self.spec.path.stat().st_size + sum(a.path.stat().st_size for a in self.spec.adapters.values())) / 2**20

    def load(self) -> None:
        import llama_cpp
        from llama_cpp import Llama

        from ..export.model_info import info_from_gguf
        from ..toolcalls import register_handler

        # the GGUF's own template through edgetune's handler: the stock one for plain templates, reasoning
        # split into reasoning_content for thinking templates (edgetune/reasoning.py)
        chat_format = register_handler() if info_from_gguf(self.spec.path).chat_template else None
        # batching: this Llama only tokenizes and renders (the engine has the context that decodes)
        llm = Llama(model_path=str(self.spec.path), n_ctx=256 if self.batching else self.spec.n_ctx,
                    n_threads=self.n_threads, n_threads_batch=self.n_threads, chat_format=chat_format, verbose=False,
                    flash_attn=self.spec.use_flash_attn)  # the batch engine copies these context settings
        adapters = {}
        for name, a in self.spec.adapters.items():
            ptr = llama_cpp.llama_adapter_lora_init(llm.model, str(a.path).encode())
            if not ptr:
                for p in adapters.values():
                    llama_cpp.llama_adapter_lora_free(p)
                llm.close()
                raise EdgetuneError(f"llama.cpp could not load the LoRA adapter {a.path} for base {self.spec.path.name}.",
                                    where=str(a.path), fix="export it for this base: edgetune export adapter --base-gguf BASE.gguf")
            adapters[name] = ptr
        if self.batching:
            from .batch import BatchEngine

            try:
                self.engine = BatchEngine(llm, {n: (p, self.spec.adapters[n].scale) for n, p in adapters.items()},
                                          n_ctx=self.spec.kv_cells, parallel=self.spec.parallel, n_threads=self.n_threads,
                                          request_ctx=self.spec.n_ctx, reuse=self.spec.prefix_cache)
            except Exception:
                for p in adapters.values():
                    llama_cpp.llama_adapter_lora_free(p)
                llm.close()
                raise
        self.llm, self.adapters, self.current = llm, adapters, None
        self.loaded_path = self.spec.path

    def unload(self) -> None:
        import llama_cpp

        if self.llm is None:
            return
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        else:
            self.use(None)
        for p in self.adapters.values():
            llama_cpp.llama_adapter_lora_free(p)
        self.llm.close()
        self.llm, self.adapters, self.current = None, {}, None

    def runner(self, adapter: str | None, cancel: threading.Event):
        """What a request generates on: the batch engine under ``adapter``, or the ``Llama`` with
        ``adapter`` set (one request at a time)."""
        if self.engine is not None:
            from .batch import BatchLlama

            return BatchLlama(self.llm, self.engine, adapter, cancel)
        self.use(adapter)
        return self.llm

    def use(self, adapter: str | None) -> None:
        """Put ``adapter`` (None: none) on the context; forget the KV cache if it changed, since
        keys and values computed under another adapter are wrong for this one."""
        import llama_cpp

        if adapter == self.current:
            return
        if not hasattr(llama_cpp, "llama_set_adapters_lora"):  # llama-cpp-python before the 0.3.2x rename
            llama_cpp.llama_clear_adapter_lora(self.llm.ctx)
            rc = 0 if adapter is None else llama_cpp.llama_set_adapter_lora(
                self.llm.ctx, self.adapters[adapter], self.spec.adapters[adapter].scale)
        elif adapter is None:
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter])
            scales = (ctypes.c_float * 1)(self.spec.adapters[adapter].scale)
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, arr, 1, scales)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc}) for {adapter!r}")
        self.llm.reset()
        self.current = adapter


class Pool:
    """Bases by name, loaded on first use; above ``memory_cap_mb`` idle bases are unloaded,
    least recently used first."""

    def __init__(self, cfg: TeamConfig, n_threads: int):
        self.cfg = cfg
        self.bases = {name: LoadedBase(spec, spec.n_threads or n_threads) for name, spec in cfg.bases.items()}
        self.loads = 0
        self.unloads = 0
        # request threads: each admitted request waits in one for its tokens (the default pool has too few)
        from concurrent.futures import ThreadPoolExecutor

        self.executor = ThreadPoolExecutor(max_workers=sum(2 * b.spec.parallel + 2 for b in self.bases.values()),
                                           thread_name_prefix="edgetune-request")

    def loaded(self) -> list[LoadedBase]:
        return [b for b in self.bases.values() if b.llm is not None]

    async def ensure_loaded(self, base: LoadedBase) -> None:
        if base.llm is not None:
            return
        async with base.load_lock:
            if base.llm is not None:
                return
            cap = self.cfg.memory_cap_mb
            if cap:
                idle = sorted((b for b in self.loaded() if b is not base and not b.running and not b.waiting and not b.waiting_background),
                              key=lambda b: b.last_used)
                while idle and sum(b.size_mb for b in self.loaded()) + base.size_mb > cap:
                    victim = idle.pop(0)
                    await asyncio.to_thread(victim.unload)
                    self.unloads += 1
                if self.loaded() and sum(b.size_mb for b in self.loaded()) + base.size_mb > cap:
                    raise Overloaded(f"memory cap {cap:.0f} MB reached and every loaded base is busy", retry_after=5)
            await asyncio.to_thread(base.load)
            self.loads += 1

    async def submit(self, model_id: str, body: dict, *, disconnected: Callable[[], Awaitable[bool]] | None = None,
                     on_delta: Callable[[dict], None] | None = None, on_turn: Callable[[], None] | None = None,
                     background: bool = False, text: bool = False) -> Completion:
        """Wait for a turn on the model's base (bounded), generate (in a thread) on the model's adapter,
        cancelling when ``disconnected()`` turns true. ``background``: a shadow run (its own queue
        bound); ``text``: a ``/v1/completions`` request (``prompt``), not a chat."""
        spec, adapter = self.cfg.locate(model_id)
        base = self.bases[spec.name]
        await self.follow(base)
        async with self.turn_on(base, background):
            if on_turn is not None:
                on_turn()
            await self.ensure_loaded(base)
            cancel = threading.Event()

            def work() -> Completion:
                check_schema(base.llm, body)
                return (run_text if text else run_chat)(base.runner(adapter, cancel), body, cancel, on_delta)

            fut = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(self.executor, work))
            try:
                while not fut.done():
                    await asyncio.wait({fut}, timeout=0.05)
                    if not fut.done() and disconnected is not None and await disconnected():
                        cancel.set()
            except asyncio.CancelledError:
                cancel.set()  # the client went away (streaming): stop, then give the turn back
                await asyncio.shield(fut)
                raise
            return fut.result()

    async def follow(self, base: LoadedBase) -> None:
        """A base served from a registry alias (``registry:NAME@prod``) whose alias moved: it is unloaded
        as soon as no request runs on it, so the next request loads the new version (no restart)."""
        spec = base.spec
        if not spec.source or time.monotonic() - base.checked < 1.0:
            return
        base.checked = time.monotonic()
        try:
            await asyncio.to_thread(spec.refresh)
        except EdgetuneError as exc:  # the alias went away: keep serving what is loaded
            log.warning("base %s: %s", spec.name, exc.message)
            return
        if base.llm is not None and base.loaded_path != spec.path and not base.running:
            async with base.load_lock:
                if base.llm is not None and not base.running:
                    log.warning("base %s: %s now serves %s; reloading", spec.name, spec.source, spec.version)
                    await asyncio.to_thread(base.unload)

    def turn_on(self, base: LoadedBase, background: bool = False):
        return _Turn(self.cfg, base, background)


class _Turn:
    """Admission to a base: refuse at once when the queue is full, or after the timeout."""

    def __init__(self, cfg: TeamConfig, base: LoadedBase, background: bool = False):
        self.cfg, self.base = cfg, base
        self.counter = "waiting_background" if background else "waiting"

    async def __aenter__(self):
        b = self.base
        queued = getattr(b, self.counter)
        if b.turn.locked() and queued >= self.cfg.queue_depth:  # locked: every running place is taken
            raise Overloaded(f"queue for {b.spec.name} is full ({queued} waiting)", retry_after=_retry(self.cfg))
        setattr(b, self.counter, queued + 1)
        try:
            await asyncio.wait_for(b.turn.acquire(), timeout=self.cfg.queue_timeout)
        except TimeoutError:
            raise Overloaded(f"no turn on {b.spec.name} within {self.cfg.queue_timeout:g} s", retry_after=_retry(self.cfg)) from None
        finally:
            setattr(b, self.counter, getattr(b, self.counter) - 1)
        b.running += 1
        return self

    async def __aexit__(self, *exc):
        self.base.running -= 1
        self.base.last_used = time.monotonic()
        self.base.turn.release()


def response_schema(body: dict) -> dict | None:
    """The request's JSON schema: OpenAI's ``response_format: {type: json_schema, json_schema: {schema}}``
    or llama-cpp-python's ``{type: json_object, schema}``; normalises ``body`` to the latter, which the
    chat handlers take. None when the request has no schema."""
    rf = body.get("response_format")
    if not isinstance(rf, dict):
        return None
    if rf.get("type") == "json_schema":
        spec = rf.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format json_schema needs json_schema.schema (a JSON schema object)")
        body["response_format"] = rf = {"type": "json_object", "schema": schema}
    elif rf.get("type") not in ("json_object", "text", None):
        raise BadRequest(f"response_format type {rf.get('type')!r} is not one of text, json_object, json_schema")
    return rf.get("schema") if rf.get("type") == "json_object" else None


def check_schema(llm, body: dict) -> None:
    """Refuse (``BadRequest``) a JSON schema llama.cpp cannot turn into a grammar — the chat handler
    would quietly fall back to any JSON instead."""
    schema = response_schema(body)
    if schema is None:
        return
    import json

    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        g = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as exc:  # noqa: BLE001 - the converter's own error names the problem
        raise BadRequest(f"the response_format JSON schema cannot be turned into a grammar: {exc}") from None
    ptr = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, g._grammar.encode("utf-8"), g._root.encode("utf-8"))
    if not ptr:
        raise BadRequest("llama.cpp could not compile the grammar of the response_format JSON schema")
    llama_cpp.llama_sampler_free(ptr)


def _retry(cfg: TeamConfig) -> int:
    return max(1, min(30, int(cfg.queue_timeout / 4) or 1))
