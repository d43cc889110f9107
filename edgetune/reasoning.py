"""Reasoning ("thinking") text: where a chat template puts it, and how to take it back out.

Thinking models (Qwen3, DeepSeek-R1 distills) write their reasoning inside a block before the
answer (``<think>…</think>``). The chat template decides how a conversation's reasoning is
rendered (the assistant message's ``reasoning_content``, the request's ``enable_thinking`` switch);
the served / evaluated reply has to be split back into reasoning and answer. One module for both
sides, used by the data stage, eval, serve and the Ollama check. Source of the conventions:
Qwen3's chat template (``reasoning_content``, ``enable_thinking``; thinking off = an empty block
prefilled after the generation prompt), vLLM's and llama.cpp server's ``reasoning_content`` reply
field, Ollama's ``think`` request field and ``.Thinking`` / ``.Think`` / ``.IsThinkSet`` template values.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

# Input field names that carry an assistant turn's reasoning (canonical first): HF/vLLM/DeepSeek use
# reasoning_content, Ollama's API uses thinking, some exports use reasoning.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Block markers edgetune recognises in a chat template (one row per convention).
MARKERS: tuple[tuple[str, str], ...] = (("<think>", "</think>"),)
_PROBE = "\u2063EDGETUNE_REASONING\u2063"


@dataclass(frozen=True)
class Thinking:
    """What a chat template does with reasoning.

    ``renders``: an assistant message's ``reasoning_content`` appears in the rendering;
    ``switch``: ``enable_thinking=False`` changes the generation prompt (thinking can be turned off);
    ``opened``: the generation prompt with thinking on already opens the block (DeepSeek-R1 style),
    so the reply starts inside the reasoning.
    """

    renders: bool = False
    switch: bool = False
    opened: bool = False
    open: str = "<think>"
    close: str = "</think>"

    @property
    def any(self) -> bool:
        return self.renders or self.switch or self.opened


NONE = Thinking()


def markers_in(template: str | None) -> tuple[str, str] | None:
    if not template:
        return None
    return next(((o, c) for o, c in MARKERS if o in template and c in template), None)


def probe(template: str | None, render: Callable[..., str]) -> Thinking:
    """How ``template`` treats reasoning; ``render(messages, add_generation_prompt, **kwargs)`` renders it."""
    marks = markers_in(template)
    if marks is None:
        return NONE
    user = [{"role": "user", "content": "Hi"}]
    try:
        shown = render(user + [{"role": "assistant", "content": "Hello", "reasoning_content": _PROBE}], False)
        off = render(user, True, enable_thinking=False)
        on_explicit = render(user, True, enable_thinking=True)
    except Exception:  # noqa: BLE001 - a template that rejects the probe simply has no thinking we can use
        return NONE
    opened = on_explicit.rstrip().endswith(marks[0])
    return Thinking(renders=_PROBE in shown, switch=off != on_explicit, opened=opened, open=marks[0], close=marks[1])


def probe_tokenizer(tokenizer) -> Thinking:
    """:func:`probe` for an HF tokenizer's chat template."""
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    cached = getattr(tokenizer, "_edgetune_thinking", None)
    if cached is not None and cached[0] == template:
        return cached[1]

    def render(msgs, agp, **kw):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp, **kw)

    out = probe(template, render)
    try:
        tokenizer._edgetune_thinking = (template, out)
    except AttributeError:
        pass
    return out


def probe_jinja(template: str | None, bos_token: str = "", eos_token: str = "") -> Thinking:
    """:func:`probe` for a Jinja template text (rendered as transformers does)."""
    from .jinja import render_jinja

    def render(msgs, agp, **kw):
        return render_jinja(template, msgs, add_generation_prompt=agp, bos_token=bos_token, eos_token=eos_token, **kw)

    return probe(template, render)


def split(text: str, thinking: Thinking, *, started: bool | None = None) -> tuple[str | None, str]:
    """A reply -> (reasoning or None, answer).

    ``started``: the prompt already opened the block (default: ``thinking.opened``), so the reply
    begins inside it. A block that never closes (the reply ran out of tokens) is all reasoning and
    the answer is empty, as vLLM and llama.cpp's server report it.
    """
    if not thinking.any:
        return None, text
    started = thinking.opened if started is None else started
    o, c = thinking.open, thinking.close
    body = text.lstrip()
    if not started:
        if not body.startswith(o):
            return None, text
        body = body[len(o):]
    k = body.find(c)
    if k < 0:
        return body.strip() or None, ""
    return body[:k].strip() or None, body[k + len(c):].lstrip()


class StreamSplit:
    """Streaming :func:`split`: ``feed(piece)`` -> (reasoning delta, answer delta) safe to send now."""

    def __init__(self, thinking: Thinking, *, started: bool | None = None):
        self.t = thinking
        self.state = "answer" if not thinking.any else ("reasoning" if (thinking.opened if started is None else started) else "start")
        self.buf = ""
        self.sent_reasoning = False

    def feed(self, piece: str) -> tuple[str, str]:
        self.buf += piece
        reasoning = answer = ""
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if not s:
                    return reasoning, answer
                if s.startswith(self.t.open):
                    self.buf, self.state = s[len(self.t.open):].lstrip(), "reasoning"
                    continue
                if self.t.open.startswith(s):
                    return reasoning, answer  # maybe the opener, not complete yet
                self.state = "answer"
                continue
            if self.state == "reasoning":
                if not self.sent_reasoning:  # reasoning is sent stripped, as split() returns it
                    self.buf = self.buf.lstrip()
                k = self.buf.find(self.t.close)
                if k >= 0:
                    reasoning += self.buf[:k].rstrip()
                    self.buf, self.state = self.buf[k + len(self.t.close):], "after"
                    continue
                # hold back what may be the start of the closing marker, and trailing whitespace before it
                end = len(self.buf[:len(self.buf) - _partial_suffix(self.buf, self.t.close)].rstrip())
                reasoning += self.buf[:end]
                self.sent_reasoning = self.sent_reasoning or end > 0
                self.buf = self.buf[end:]
                return reasoning, answer
            if self.state == "after":
                s = self.buf.lstrip()
                if not s:
                    self.buf = ""
                    return reasoning, answer
                self.buf, self.state = s, "answer"
                continue
            answer += self.buf
            self.buf = ""
            return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """What is still held at the end of the reply."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest.rstrip() if self.sent_reasoning else rest.strip(), ""
        return "", rest if self.state in ("answer", "start") else rest.lstrip()


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def reasoning_of(message: dict) -> str | None:
    """An assistant message's reasoning from any of :data:`REASONING_FIELDS`."""
    for f in REASONING_FIELDS:
        v = message.get(f)
        if isinstance(v, str) and v.strip():
            return v
    return None


def render_kwargs(think: bool | None, thinking: Thinking) -> dict:
    """The chat-template kwargs for a thinking choice (nothing when the template has no switch)."""
    return {"enable_thinking": bool(think)} if think is not None and thinking.switch else {}


# The thinking setting of the request being served (None = not set: the template's default). Set by
# the servers from the request body (request_think) and read by the chat handler, which llama-cpp-python
# calls without the request's extra fields.
REQUEST_THINK: contextvars.ContextVar[bool | None] = contextvars.ContextVar("edgetune_request_think", default=None)


def request_think(body: dict) -> bool | None:
    """A chat request's thinking choice: Ollama's ``think`` (true/false or a level), vLLM's and
    llama.cpp's ``chat_template_kwargs.enable_thinking``, or ``reasoning_effort: "none"`` (off)."""
    if not isinstance(body, dict):
        return None
    kw = body.get("chat_template_kwargs")
    if isinstance(kw, dict) and isinstance(kw.get("enable_thinking"), bool):
        return kw["enable_thinking"]
    t = body.get("think")
    if isinstance(t, bool):
        return t
    if isinstance(t, str) and t:
        return t.lower() not in ("none", "off", "false")
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort:
        return effort.lower() != "none"
    return None
