"""Input formats -> one internal record type.

Every input row, whatever its layout (chat, Alpaca instruction, ShareGPT, text, prompt/completion,
preference), becomes a :class:`Record`: a list of ``{"role", "content"}`` messages plus a ``kind``.
Later stages (cleaning, dedup, split, token stats) only ever see that shape. A row that cannot be
normalised raises :class:`Problem`, naming the field, which the caller turns into a report line
(file:line) and a reject; never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .problems import Problem

FORMATS = ("chat", "instruction", "sharegpt", "completion", "preference")
KINDS = ("chat", "completion", "text", "preference")

# ShareGPT / assorted exports use other role names; one row per alias.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
    "observation": "tool",
}


@dataclass(slots=True)
class Record:
    messages: list[dict]  # [{"role", "content"}]; for text: [] ; for preference: the prompt turns
    kind: str  # chat | completion | text | preference
    fmt: str  # the detected/forced input format
    source: str = ""
    line: int = 0
    text: str | None = None  # kind == text
    chosen: Any = None  # kind == preference: str or list of messages
    rejected: Any = None
    tools: Any = None  # chat: the declared tools in canonical form (edgetune.data.tools)
    tool_notes: Any = None  # what tool canonicalisation did (edgetune.data.tools.Notes), for the data card
    group: str | None = None  # value of the group-by field
    # chat: the template's thinking switch for this record (enable_thinking), None = not set; the data
    # stage decides it from data.thinking and whether the record carries reasoning (reasoning_content)
    thinking: bool | None = None
    raw: Any = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def dedup_text(self) -> str:
        """The text duplicates are judged on (roles included, so a question != its answer)."""
        if self.kind == "text":
            return self.text or ""
        parts = [_turn_text(m) for m in self.messages]
        if self.tools:
            parts.insert(0, "tools: " + json.dumps(self.tools, ensure_ascii=False))
        if self.kind == "preference":
            parts += [f"chosen: {_flat(self.chosen)}", f"rejected: {_flat(self.rejected)}"]
        return "\n".join(parts)

    def near_text(self) -> str:
        """The text near-duplicates are judged on: without system turns, which are usually one
        shared prompt and would make every short example look alike."""
        if self.kind == "text":
            return self.text or ""
        parts = [_turn_text(m) for m in self.messages if m["role"] != "system"]
        if self.kind == "preference":
            parts += [f"chosen: {_flat(self.chosen)}", f"rejected: {_flat(self.rejected)}"]
        return "\n".join(parts)

    def to_row(self, layout: str) -> dict:
        """The mlx-lm layout row: ``messages`` / ``prompt``+``completion`` / ``text`` / preference."""
        if layout == "text":
            return {"text": self.text}
        if layout == "completion":
            return {"prompt": self.messages[0]["content"], "completion": self.messages[1]["content"]}
        if layout == "preference":
            prompt: Any = self.messages
            if len(self.messages) == 1 and self.messages[0]["role"] == "user":
                prompt = self.messages[0]["content"]
            row = {"prompt": prompt, "chosen": self.chosen, "rejected": self.rejected}
            if self.thinking is not None:
                row["enable_thinking"] = self.thinking
            return row
        row: dict = {"messages": self.messages}
        if self.tools is not None:
            row["tools"] = self.tools
        if self.thinking is not None:
            row["enable_thinking"] = self.thinking
        return row

    @property
    def has_reasoning(self) -> bool:
        turns = list(self.messages)
        for answer in (self.chosen, self.rejected):
            if isinstance(answer, list):
                turns += answer
        return any(m.get("reasoning_content") for m in turns)


def _turn_text(m: dict) -> str:
    calls = m.get("tool_calls")
    why = m.get("reasoning_content")
    return (f"{m['role']}: " + (f"<reasoning>{why}</reasoning> " if why else "") + m["content"]
            + (" " + json.dumps(calls, ensure_ascii=False) if calls else ""))


def _flat(x: Any) -> str:
    if isinstance(x, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in x if isinstance(m, dict))
    return str(x)


def detect_format(obj: Any) -> str | None:
    """The input format of one row, or None. Order matters: the most specific keys first.

    Keys holding None (empty table cells, columns of another format in a mixed Parquet file) are
    ignored first; if that finds nothing, key presence decides so the error names the empty field.
    """
    if not isinstance(obj, dict):
        return None
    for has in (lambda k: obj.get(k) is not None, lambda k: k in obj):
        if has("chosen") and has("rejected"):
            return "preference"
        if has("messages"):
            return "chat"
        if has("conversations"):
            return "sharegpt"
        if has("instruction") and (has("output") or has("response")):
            return "instruction"
        if has("prompt") and has("completion"):
            return "completion"
        if has("text"):
            return "completion"
    return None


def _string(obj: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in obj or obj[key] is None:
        raise Problem("missing_field", f"missing field '{key}'", key)
    v = obj[key]
    if not isinstance(v, str):
        raise Problem("wrong_type", f"'{key}' must be a string, got {type(v).__name__}", key)
    if not allow_empty and not v.strip():
        raise Problem("empty_field", f"'{key}' is empty", key)
    return v


def _messages(turns: Any, key: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    if not isinstance(turns, list):
        raise Problem("wrong_type", f"'{key}' must be a list, got {type(turns).__name__}", key)
    if not turns:
        raise Problem("empty_field", f"'{key}' is empty", key)
    out = []
    for i, t in enumerate(turns):
        f = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise Problem("wrong_type", f"{f} must be an object, got {type(t).__name__}", f)
        role = t.get(role_key)
        if not isinstance(role, str):
            raise Problem("missing_field" if role is None else "wrong_type", f"{f}.{role_key} missing or not a string", f"{f}.{role_key}")
        norm = ROLE_ALIASES.get(role.strip().lower())
        if norm is None:
            raise Problem("unknown_role", f"{f}.{role_key} = {role!r} is not a known role", f"{f}.{role_key}")
        content = t.get(content_key)
        msg: dict = {"role": norm}
        if norm == "assistant" and t.get("function_call") is not None and t.get("tool_calls") is None:
            t = {**t, "tool_calls": [{"type": "function", "function": t["function_call"]}]}  # OpenAI's legacy field
        if norm == "assistant" and content is None and t.get("tool_calls"):
            content = ""
        if content is None:
            raise Problem("missing_field", f"{f}.{content_key} is missing", f"{f}.{content_key}")
        if norm == "tool":
            from .tools import tool_content

            content = tool_content(content)
        if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
        ):  # OpenAI-style content parts, text only
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise Problem("wrong_type", f"{f}.{content_key} must be a string, got {type(content).__name__}", f"{f}.{content_key}")
        if not content.strip() and not t.get("tool_calls"):
            raise Problem("empty_field", f"{f}.{content_key} is empty", f"{f}.{content_key}")
        msg["content"] = content
        if norm == "assistant":
            _reasoning(t, msg, f, content_key)
        for extra in ("tool_calls", "name", "tool_call_id"):
            if t.get(extra) is not None:
                msg[extra] = t[extra]
        out.append(msg)
    return out


def _reasoning(t: dict, msg: dict, f: str, content_key: str) -> None:
    """An assistant turn's reasoning as ``reasoning_content`` (from ``reasoning_content`` / ``thinking`` /
    ``reasoning``, or a ``<think>…</think>`` block leading the content), stripped as the chat templates
    that render it strip it."""
    from ..reasoning import MARKERS, REASONING_FIELDS, Thinking, split

    for key in REASONING_FIELDS:
        v = t.get(key)
        if v is None:
            continue
        if not isinstance(v, str):
            raise Problem("wrong_type", f"{f}.{key} must be a string, got {type(v).__name__}", f"{f}.{key}")
        if v.strip():
            msg["reasoning_content"] = v.strip()
        return
    for o, c in MARKERS:
        if msg["content"].lstrip().startswith(o) and c in msg["content"]:
            r, answer = split(msg["content"], Thinking(renders=True, open=o, close=c))
            if not answer.strip() and not t.get("tool_calls"):
                raise Problem("empty_field", f"{f}.{content_key} has reasoning ({o}…{c}) but no answer after it",
                              f"{f}.{content_key}")
            msg["content"] = answer
            if r:
                msg["reasoning_content"] = r
            return


def _thinking_flag(obj: dict) -> bool | None:
    v = obj.get("enable_thinking")
    if v is None:
        return None
    if not isinstance(v, bool):
        raise Problem("wrong_type", f"'enable_thinking' must be true or false, got {v!r}", "enable_thinking")
    return v


def check_order(messages: list[dict], key: str, need_assistant: bool = True) -> None:
    """System only first; then user/assistant alternating (tool turns follow an assistant call)."""
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise Problem("no_assistant", "no assistant turn (nothing to learn from)", key)
    prev = None
    for i, m in enumerate(messages):
        r = m["role"]
        if r == "system" and i != 0:
            raise Problem("role_order", f"{key}[{i}]: system turn after the start", f"{key}[{i}].role")
        if r == "user" and prev == "user":
            raise Problem("role_order", f"{key}[{i}]: two user turns in a row", f"{key}[{i}].role")
        if r == "assistant" and prev in (None, "system", "assistant") and prev != "tool":
            raise Problem("role_order", f"{key}[{i}]: assistant turn without a user turn before it", f"{key}[{i}].role")
        if r == "tool" and prev not in ("assistant", "tool"):
            raise Problem("role_order", f"{key}[{i}]: tool turn not after an assistant turn", f"{key}[{i}].role")
        prev = r
    if need_assistant and messages[-1]["role"] not in ("assistant",):
        raise Problem("last_not_assistant", f"the last turn is '{messages[-1]['role']}', not assistant", f"{key}[{len(messages) - 1}]")


def _with_tools(rec: Record, tools: Any, key: str) -> Record:
    """Declared tools, tool calls and tool results validated and put in canonical form."""
    from .tools import Notes, canonical_messages, canonical_tools, has_tool_turns

    notes = Notes()
    rec.tools = canonical_tools(tools, notes) if tools is not None else None
    if rec.tools is not None or has_tool_turns(rec.messages):
        rec.messages = canonical_messages(rec.messages, rec.tools, key, notes)
        rec.tool_notes = notes
    return rec


def normalise(obj: Any, fmt: str = "auto") -> Record:
    """One input row -> :class:`Record`, or raise :class:`Problem`."""
    if not isinstance(obj, dict):
        raise Problem("not_object", f"record is a JSON {type(obj).__name__}, not an object")
    detected = detect_format(obj)
    if fmt == "auto":
        if detected is None:
            keys = ", ".join(sorted(map(str, obj))) or "none"
            raise Problem("unknown_format", f"cannot tell the format (keys: {keys})")
        fmt = detected
    if fmt == "chat":
        if "messages" not in obj:
            raise Problem("missing_field", "missing field 'messages'", "messages")
        msgs = _messages(obj["messages"], "messages")
        check_order(msgs, "messages")
        return _with_tools(Record(msgs, "chat", fmt, thinking=_thinking_flag(obj)), obj.get("tools"), "messages")
    if fmt == "sharegpt":
        if "conversations" not in obj:
            raise Problem("missing_field", "missing field 'conversations'", "conversations")
        from .tools import sharegpt_turns

        msgs = _messages(sharegpt_turns(obj["conversations"]), "conversations", "from", "value")
        if isinstance(obj.get("system"), str) and obj["system"].strip() and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": obj["system"]})
        check_order(msgs, "conversations")
        return _with_tools(Record(msgs, "chat", fmt, thinking=_thinking_flag(obj)), obj.get("tools"), "conversations")
    if fmt == "instruction":
        instruction = _string(obj, "instruction")
        out_key = "output" if obj.get("output") is not None or "response" not in obj else "response"
        output = _string(obj, out_key)
        inp = obj.get("input")
        if inp is not None and not isinstance(inp, str):
            raise Problem("wrong_type", f"'input' must be a string, got {type(inp).__name__}", "input")
        user = instruction + ("\n\n" + inp if inp and inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        _reasoning({}, msgs[1], out_key, out_key)  # a leading <think>…</think> block is reasoning
        system = obj.get("system")
        if isinstance(system, str) and system.strip():
            msgs.insert(0, {"role": "system", "content": system})
        return Record(msgs, "chat", fmt)
    if fmt == "completion":
        if obj.get("prompt") is not None or obj.get("completion") is not None or "text" not in obj:
            prompt = _string(obj, "prompt")
            completion = _string(obj, "completion")
            return Record([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], "completion", fmt)
        text = _string(obj, "text")
        return Record([], "text", fmt, text=text)
    if fmt == "preference":
        if "prompt" not in obj:
            raise Problem("missing_field", "missing field 'prompt'", "prompt")
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise Problem("empty_field", "'prompt' is empty", "prompt")
            msgs = [{"role": "user", "content": prompt}]
        else:
            msgs = _messages(prompt, "prompt")
            check_order(msgs, "prompt", need_assistant=False)
        pair = []
        for key in ("chosen", "rejected"):
            v = obj.get(key)
            if isinstance(v, str):
                if not v.strip():
                    raise Problem("empty_field", f"'{key}' is empty", key)
            elif isinstance(v, list):
                v = _messages(v, key)
            else:
                raise Problem("wrong_type" if v is not None else "missing_field", f"'{key}' must be a string or a message list", key)
            pair.append(v)
        if pair[0] == pair[1]:
            raise Problem("chosen_equals_rejected", "'chosen' and 'rejected' are identical", "chosen")
        return Record(msgs, "preference", fmt, chosen=pair[0], rejected=pair[1])
    raise Problem("unknown_format", f"unknown format {fmt!r}")
