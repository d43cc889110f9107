"""The tool-call syntax table: one row per way a chat model writes tool calls, and the parser.

* :data:`SYNTAXES`: one row per call syntax, recognised from the Jinja chat template that defines
  it (Hermes ``<tool_call>`` blocks for Qwen2.5/Qwen3 and Hermes-style templates, Llama 3.1/3.2's
  bare ``{"name", "parameters"}`` JSON, Mistral's ``[TOOL_CALLS] [...]`` list). Source: each
  family's reference chat template (tokenizer_config.json on the HF hub). A chat family
  (:data:`edgetune.chat_families.FAMILIES`) points at its row by name (``Family.tools``);
  tests/test_tables.py checks each pointer against what :func:`syntax_for` detects in the family's
  template.
* :func:`parse_calls`: generated text -> content + calls, or a :class:`Parsed` with ``error`` when
  the model started a call it did not finish well (bad JSON, an undeclared tool, arguments that are
  not an object). Never raises on model output.

Used by eval (scoring calls), training rewards and ``edgetune serve`` (:mod:`edgetune.toolcalls`).
Imports nothing of edgetune's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Parsed:
    content: str  # text outside the calls ("" when the reply is only calls)
    calls: list[dict] = field(default_factory=list)  # [{"name", "arguments": dict}]
    error: str | None = None  # set when a call was attempted but is malformed
    attempted: bool = False  # the reply started a call (whatever came of it)


class _Malformed(Exception):
    pass


def _args(obj: dict, key: str) -> dict:
    """A call's arguments as an object (a JSON string holding an object is accepted)."""
    if key not in obj:
        raise _Malformed(f"the call has no '{key}'")
    a = obj[key]
    if isinstance(a, str):
        try:
            a = json.loads(a)
        except ValueError as exc:
            raise _Malformed(f"the arguments are not valid JSON ({exc})") from None
    if not isinstance(a, dict):
        raise _Malformed(f"the arguments are a JSON {type(a).__name__}, not an object")
    return a


def _call(obj: Any, args_keys: tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        raise _Malformed(f"a call is a JSON {type(obj).__name__}, not an object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise _Malformed("a call has no tool name")
    key = next((k for k in args_keys if k in obj), args_keys[0])
    return {"name": name, "arguments": _args(obj, key)}


def _json_values(text: str) -> list[Any]:
    """Consecutive JSON values in ``text`` (separated by whitespace, ',' or ';')."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,;":
            i += 1
        if i >= len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError as exc:
            raise _Malformed(f"the call is not valid JSON ({exc.args[0]})") from None
        out.append(value)


# ------------------------------------------------------------------------------ per-syntax parsers
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def _parse_hermes(text: str) -> tuple[str, list[dict]]:
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks, any number."""
    first = text.find("<tool_call>")
    content = text[:first].strip()
    calls = []
    for body in _HERMES.findall(text[first:]):
        values = _json_values(body.strip())
        if len(values) != 1:
            raise _Malformed("a <tool_call> block holds no call" if not values else "a <tool_call> block holds several values")
        calls.append(_call(values[0], ("arguments", "parameters")))
    rest = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text[first:], flags=re.DOTALL).strip()
    return (content + ("\n" + rest if rest and content else rest)).strip(), calls


def _parse_llama3(text: str) -> tuple[str, list[dict]]:
    """The whole reply is ``{"name": ..., "parameters": {...}}`` (``<|python_tag|>`` optional;
    several objects separated by ';' are accepted, as Llama 3.2 sometimes emits)."""
    body = text.replace("<|python_tag|>", "").strip()
    values = _json_values(body)
    return "", [_call(v, ("parameters", "arguments")) for v in values]


def _parse_mistral(text: str) -> tuple[str, list[dict]]:
    """``[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}, ...]`` (v0.3), or the newer
    ``[TOOL_CALLS]name[ARGS]{...}`` form. The control token itself may have been dropped by the
    detokenizer, so a reply opening with ``[{"`` counts too."""
    i = text.find("[TOOL_CALLS]")
    content = text[:i].strip() if i >= 0 else ""
    body = text[i + len("[TOOL_CALLS]"):] if i >= 0 else text
    if "[ARGS]" in body:
        calls = []
        for part in body.split("[TOOL_CALLS]"):
            name, _, args = part.partition("[ARGS]")
            values = _json_values(args.strip())
            if len(values) != 1:
                raise _Malformed("a [TOOL_CALLS] entry has no arguments")
            calls.append({"name": name.strip(), "arguments": _args({"a": values[0]}, "a")})
        return content, calls
    values = _json_values(body.strip())
    if len(values) != 1 or not isinstance(values[0], list):
        raise _Malformed("[TOOL_CALLS] is not followed by one JSON list of calls")
    return content, [_call(v, ("arguments", "parameters")) for v in values[0]]


@dataclass(frozen=True)
class Syntax:
    """How one family writes tool calls."""

    name: str
    detect: Callable[[str], bool]  # over the Jinja chat template source
    openers: tuple[str, ...]  # text that starts a call anywhere in the reply
    leading: tuple[str, ...]  # text that starts a call only at the start of the reply
    parse: Callable[[str], tuple[str, list[dict]]]
    prefix: Callable[[str | None], str]  # prompt prefill forcing a call (to the named tool, if given)
    closer: str  # text that closes a forced call after its grammar-constrained arguments
    families: str = ""


def _hermes_prefix(name):
    return "<tool_call>\n" + (f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": ' if name else "")


def _llama3_prefix(name):
    return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "parameters": ' if name else '{"name": "'


def _mistral_prefix(name):
    return "[TOOL_CALLS] [" + (f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": ' if name else "")


# Order matters: the first row whose detect matches a template wins.
SYNTAXES: tuple[Syntax, ...] = (
    Syntax("hermes", lambda j: "<tool_call>" in j, ("<tool_call>",), (), _parse_hermes, _hermes_prefix,
           "}\n</tool_call>", "Qwen2.5 / Qwen3 / Hermes-2-Pro and Hermes-style templates (edgetune's smollm2-tools)"),
    Syntax("mistral", lambda j: "[TOOL_CALLS]" in j, ("[TOOL_CALLS]",), ("[{",), _parse_mistral, _mistral_prefix,
           "}]", "Mistral-7B-Instruct-v0.3, Mistral Nemo / Small (template with [AVAILABLE_TOOLS])"),
    Syntax("llama3-json", lambda j: "<|start_header_id|>" in j and "tools" in j and '"parameters"' in j,
           ("<|python_tag|>",), ("{",), _parse_llama3, _llama3_prefix, "}", "Llama 3.1 / 3.2 / 3.3 Instruct"),
)
SYNTAX_BY_NAME = {s.name: s for s in SYNTAXES}


def syntax_for(template: str | None) -> Syntax | None:
    """The call syntax a Jinja chat template defines, or None (the template has no tool calls)."""
    if not template:
        return None
    return next((s for s in SYNTAXES if s.detect(template)), None)


def starts_call(syntax: Syntax, text: str) -> int:
    """Index where a call starts in ``text`` (-1: none)."""
    found = [i for i in (text.find(o) for o in syntax.openers) if i >= 0]
    stripped = text.lstrip()
    if any(stripped.startswith(o) for o in syntax.leading):
        found.append(len(text) - len(stripped))
    return min(found, default=-1)


def parse_calls(text: str, syntax: Syntax | None, tools: list[dict] | None = None) -> Parsed:
    """Split a reply into content and tool calls. A started but malformed call gives ``error``
    (and the raw text as content); calls naming a tool not in ``tools`` are malformed too."""
    text = text or ""
    if syntax is None or starts_call(syntax, text) < 0:
        return Parsed(text)
    try:
        content, calls = syntax.parse(text)
        if not calls:
            raise _Malformed("a call was started but none was written")
        declared = {t.get("function", t).get("name") for t in tools or [] if isinstance(t, dict)}
        unknown = [c["name"] for c in calls if tools and c["name"] not in declared]
        if unknown:
            raise _Malformed(f"the call names {unknown[0]!r}, which is not one of the declared tools ({', '.join(sorted(declared))})")
    except _Malformed as exc:
        return Parsed(text, [], str(exc), attempted=True)
    return Parsed(content, calls, None, attempted=True)
