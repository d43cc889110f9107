"""Tool calls in and out of a chat model: per-family call syntax, parsing, OpenAI shapes, serving.

A chat model emits tool calls as text in its family's syntax; OpenAI clients send and expect
structured ``tools`` / ``tool_calls``. This module is the glue between the two, used by
``edgetune serve`` (a llama-cpp-python chat handler, :func:`register_handler`) and by the eval
runners (:func:`parse_calls` on generated text):

* :data:`SYNTAXES` and :func:`parse_calls` (re-exported): the syntax table and the parser, in
  :mod:`edgetune.tool_syntax` (the bottom layer, so chat families can point at a row).
* :func:`prepare_messages`: request history -> what the template renders (``arguments`` JSON
  strings become objects, as the training data had them).

Written by hand because llama-cpp-python's generic chat handler renders tools but never parses a
model's calls back, and its ``functionary``/``chatml-function-calling`` handlers impose their own
prompt format instead of the GGUF's template (the prompt served must be the prompt trained).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator

from .tool_syntax import (  # noqa: F401  (re-exported: what eval, rewards and serve import from here)
    SYNTAX_BY_NAME,
    SYNTAXES,
    Parsed,
    Syntax,
    parse_calls,
    syntax_for,
)
from .tool_syntax import starts_call as _starts_call

log = logging.getLogger("edgetune.serve")
HANDLER_NAME = "edgetune-tools"  # the llama-cpp-python chat_format name edgetune serve uses
INVALID = "invalid_tool_call"  # finish_reason of a reply that started a call it did not finish well


# ------------------------------------------------------------------------------ request side
def prepare_messages(messages: list[dict]) -> list[dict]:
    """Request messages as the chat template expects them: a call's ``arguments`` JSON string
    becomes the object the training data held (templates print it with ``tojson``: a string would
    be quoted twice), ``content: null`` becomes ""."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        parsed = json.loads(fn["arguments"])
                        if isinstance(parsed, dict):
                            fn["arguments"] = parsed
                    except ValueError:
                        pass  # left as the client sent it
                c["function"] = fn
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out


def canonical_request(messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """Request history and tools in the canonical form training data gets (edgetune.data.tools:
    Ollama's key order, property names and argument keys sorted), so the served prompt is the
    trained one whatever order the client wrote; the request as sent when it does not validate."""
    from .data.formats import Problem
    from .data.tools import Notes, canonical_messages, canonical_tools

    messages = prepare_messages(messages)
    try:
        canon = canonical_tools(tools, Notes())
        return canonical_messages(messages, canon, "messages", Notes()), canon
    except (Problem, KeyError, TypeError, ValueError):
        return messages, tools


def openai_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls -> OpenAI ``tool_calls`` (arguments as a JSON string, fresh ids)."""
    return [{"id": "call_" + secrets.token_hex(12), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def finish_for(parsed: Parsed, finish: str | None) -> str:
    """The OpenAI finish_reason of a parsed reply: tool_calls, invalid_tool_call, or the runtime's
    own (length when the reply was cut off mid-call)."""
    if parsed.calls:
        return "tool_calls"
    if parsed.error:
        return "length" if finish == "length" else INVALID
    return finish or "stop"


# ------------------------------------------------------------------------------ streaming
class StreamSplitter:
    """Streams content while it cannot be the start of a call, holds the rest back.

    ``feed(piece)`` returns the text safe to send now; once a call opener appears everything after
    it is held for :func:`parse_calls` at the end. ``held`` is what was not sent.
    """

    def __init__(self, syntax: Syntax | None):
        self.syntax = syntax
        self.text = ""
        self.sent = 0
        self.in_call = False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.syntax is None:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        if self.in_call:
            return ""
        start = _starts_call(self.syntax, self.text)
        if start >= 0:
            self.in_call = True
            limit = start
        else:
            limit = len(self.text) - self._partial_opener()
            stripped = self.text.lstrip()
            if any(o.startswith(stripped) for o in self.syntax.leading) or not stripped:
                limit = min(limit, self.sent)  # the reply may still open with a call
        out = self.text[self.sent:limit] if limit > self.sent else ""
        self.sent = max(self.sent, limit)
        return out

    def _partial_opener(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of an opener."""
        best = 0
        for o in self.syntax.openers:
            for k in range(min(len(o) - 1, len(self.text)), 0, -1):
                if self.text.endswith(o[:k]):
                    best = max(best, k)
                    break
        return best

    @property
    def held(self) -> str:
        return self.text[self.sent:]


# ------------------------------------------------------------------------------ llama-cpp handler
_COMPLETION_ARGS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "stop", "seed", "max_tokens",
                    "presence_penalty", "frequency_penalty", "repeat_penalty", "tfs_z", "mirostat_mode",
                    "mirostat_tau", "mirostat_eta", "model", "logits_processor", "grammar", "logit_bias")


def _formatter(llama):
    """The GGUF's own chat template as llama-cpp-python renders it (cached on the Llama object)."""
    fmt = getattr(llama, "_edgetune_formatter", None)
    if fmt is None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos, bos = llama.token_eos(), llama.token_bos()
        text = llama._model.token_get_text
        fmt = Jinja2ChatFormatter(template=llama.metadata.get("tokenizer.chat_template") or "",
                                  eos_token=text(eos) if eos != -1 else "", bos_token=text(bos) if bos != -1 else "",
                                  stop_token_ids=[eos])
        llama._edgetune_formatter = fmt
        llama._edgetune_syntax = syntax_for(fmt.template)
        from .reasoning import probe_jinja

        llama._edgetune_thinking = probe_jinja(fmt.template, fmt.bos_token, fmt.eos_token)
    return fmt


def _forced_grammar(llama, tool: dict):
    """A grammar for the arguments object of ``tool`` (its JSON schema; any JSON object if the
    schema cannot be compiled)."""
    from llama_cpp import llama_grammar

    schema = (tool.get("function") or {}).get("parameters") or {"type": "object"}
    try:
        return llama_grammar.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=llama.verbose)
    except Exception:  # noqa: BLE001 - llama.cpp's schema converter rejects some schemas; fall back
        return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=llama.verbose)


def chat_handler(*, llama, messages, functions=None, function_call=None, tools=None, tool_choice=None,
                 stream: bool = False, **kwargs):
    """llama-cpp-python chat handler: the GGUF's template, plus OpenAI tools in and tool_calls out.

    Without tools it is llama-cpp-python's own template handler (same prompt, same answer).
    ``tool_choice``: ``auto`` (default) parses whatever the model writes; ``none`` renders the
    request without tools; ``required`` prefills the family's call opener; a named function
    prefills the call up to its arguments and constrains them to the tool's JSON schema.
    """
    if functions and not tools:
        tools = [{"type": "function", "function": f} for f in functions]
    if function_call is not None and tool_choice is None:
        tool_choice = function_call if isinstance(function_call, str) else {"type": "function", "function": function_call}
    from .reasoning import REQUEST_THINK, render_kwargs

    fmt = _formatter(llama)
    syntax = llama._edgetune_syntax
    thinking = llama._edgetune_thinking
    messages, shown = canonical_request(messages, tools) if tools else (prepare_messages(messages), None)
    json_mode = (kwargs.get("response_format") or {}).get("type") == "json_object"
    if (not tools or tool_choice == "none" or syntax is None) and (not thinking.any or json_mode):
        from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

        if thinking.any and thinking.switch:  # a JSON-constrained answer has no room for a <think> block
            stock = chat_formatter_to_chat_completion_handler(_RenderWith(fmt, enable_thinking=False))
        else:
            stock = llama._chat_handlers.get("chat_template.default") or chat_formatter_to_chat_completion_handler(fmt)
        return stock(llama=llama, messages=messages, tools=None if tool_choice == "none" else shown,
                     stream=stream, **kwargs)
    if not tools or tool_choice == "none" or syntax is None:  # a thinking template without tools in play
        syntax, shown, tool_choice = None, None if tool_choice == "none" else shown, None
    forced = None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        forced = next((t for t in tools if (t.get("function") or {}).get("name") == name), None)
        if forced is None:
            raise ValueError(f"tool_choice names {name!r}, which is not one of the request's tools")
    prefix = syntax.prefix(forced["function"]["name"]) if forced else syntax.prefix(None) if tool_choice == "required" else ""
    rendered = fmt(messages=messages, tools=shown, tool_choice=tool_choice, **render_kwargs(REQUEST_THINK.get(), thinking))
    started = thinking.any and not prefix and rendered.prompt.rstrip().endswith(thinking.open)
    prompt = llama.tokenize((rendered.prompt + prefix).encode("utf-8"), add_bos=not rendered.added_special, special=True)
    args = {k: kwargs[k] for k in _COMPLETION_ARGS if k in kwargs}
    stops = [rendered.stop] if isinstance(rendered.stop, str) else list(rendered.stop or [])
    asked = args.get("stop") or []
    args["stop"] = ([asked] if isinstance(asked, str) else list(asked)) + stops
    if forced is not None:
        args["grammar"] = _forced_grammar(llama, forced)
    if kwargs.get("logprobs"):
        args["logprobs"] = kwargs.get("top_logprobs") or 1
    completion = llama.create_completion(prompt=prompt, stream=stream, stopping_criteria=rendered.stopping_criteria, **args)
    close = _closer(syntax, forced) if syntax is not None else ""
    if stream:
        return _stream_chunks(completion, syntax, tools, prefix, close, thinking, started)
    from .reasoning import split as split_reasoning

    reasoning, text = split_reasoning(prefix + completion["choices"][0]["text"], thinking, started=started)
    parsed = parse_calls(text + close, syntax, tools)
    finish = finish_for(parsed, completion["choices"][0]["finish_reason"])
    if parsed.error:
        log.warning("malformed tool call (%s): %s", finish, parsed.error)
    message: dict = {"role": "assistant", "content": (parsed.content or None) if parsed.calls else parsed.content}
    if thinking.any:  # as vLLM and llama.cpp's server return it
        message["reasoning_content"] = reasoning
    if parsed.calls:
        message["tool_calls"] = openai_calls(parsed.calls)
    return {"id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
            "model": completion["model"], "choices": [{"index": 0, "message": message, "logprobs": None,
                                                       "finish_reason": finish}],
            "usage": completion["usage"]}


class _RenderWith:
    """A chat formatter that renders with extra template kwargs (llama-cpp-python's stock handler
    passes none): thinking off for JSON-mode replies of a thinking template."""

    def __init__(self, fmt, **kw):
        self.fmt, self.kw = fmt, kw

    def __call__(self, **args):
        return self.fmt(**args, **self.kw)


def _closer(syntax: Syntax, forced: dict | None) -> str:
    """Text that closes a forced call after its grammar-constrained arguments."""
    if forced is None:
        return ""
    return syntax.closer


def _stream_chunks(chunks, syntax: Syntax | None, tools: list[dict], prefix: str, close: str,
                   thinking=None, started: bool = False) -> Iterator[dict]:
    """Completion chunks -> chat.completion.chunk dicts: reasoning streams as ``reasoning_content``
    deltas, then content streams until a call starts; the calls (or, for a malformed call, the
    held-back raw text) come at the end."""
    from .reasoning import NONE, StreamSplit

    why = StreamSplit(thinking or NONE, started=started)
    split = StreamSplitter(syntax)
    split.feed(why.feed(prefix)[1])
    base: dict = {}
    finish = None

    def chunk(delta: dict, reason: str | None = None) -> dict:
        return {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    for c in chunks:
        if not base:
            base = {"id": "chat" + c["id"], "created": c.get("created", int(time.time())), "model": c["model"]}
            yield chunk({"role": "assistant"})
        choice = c["choices"][0]
        r, a = why.feed(choice.get("text") or "")
        if r:
            yield chunk({"reasoning_content": r})
        piece = split.feed(a)
        if piece:
            yield chunk({"content": piece})
        finish = choice.get("finish_reason") or finish
    if not base:
        base = {"id": "chatcmpl-" + secrets.token_hex(8), "created": int(time.time()), "model": ""}
        yield chunk({"role": "assistant"})
    r, a = why.flush()
    if r:
        yield chunk({"reasoning_content": r})
    piece = split.feed(a)
    if piece:
        yield chunk({"content": piece})
    split.feed(close)
    parsed = parse_calls(split.text, syntax, tools)
    if parsed.error:
        log.warning("malformed tool call (%s): %s", finish_for(parsed, finish), parsed.error)
    if parsed.calls:
        for i, call in enumerate(openai_calls(parsed.calls)):
            yield chunk({"tool_calls": [{"index": i, **call}]})
    elif split.held:
        yield chunk({"content": split.held})
    yield chunk({}, finish_for(parsed, finish))


class NullContentFix:
    """ASGI middleware: OpenAI clients send an assistant turn that made tool calls back with
    ``content: null`` (as the API returned it); llama-cpp-python's request model requires a
    string and would answer 422, so null contents become "" before it validates the body.
    It also reads the request's thinking choice (``think`` / ``chat_template_kwargs.enable_thinking``),
    which llama-cpp-python's request model drops, into :data:`edgetune.reasoning.REQUEST_THINK`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, receive, send)
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        from .reasoning import REQUEST_THINK, request_think

        think = None
        try:
            req = json.loads(body)
            think = request_think(req)
            fixed = False
            for m in req.get("messages") or []:
                if isinstance(m, dict) and "content" in m and m["content"] is None:
                    m["content"] = ""
                    fixed = True
            if fixed:
                body = json.dumps(req).encode()
                headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
                scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        except (ValueError, AttributeError):
            pass  # not JSON / not an object: the app itself answers with its own error
        done = False

        async def replay():
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        token = REQUEST_THINK.set(think)
        try:
            return await self.app(scope, replay, send)
        finally:
            REQUEST_THINK.reset(token)


def register_handler() -> str:
    """Register :func:`chat_handler` with llama-cpp-python under :data:`HANDLER_NAME` (idempotent)."""
    from llama_cpp import llama_chat_format

    llama_chat_format.LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(
        HANDLER_NAME, chat_handler, overwrite=True)
    return HANDLER_NAME
