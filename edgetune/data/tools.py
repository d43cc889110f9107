"""Tool-use records: validation, the canonical form, and ShareGPT function-call conversion.

A chat record may declare ``tools`` (OpenAI/HF function list), have assistant turns with
``tool_calls`` and ``tool`` turns with results. Each record is checked on its own line (every tool's
schema shape, every call names a declared tool with a JSON-object ``arguments``, every result follows
a call, ids and names match) and rewritten into one canonical form at data time:

- key order is the struct-field order of Ollama's Go types (tool: type, function; function: name,
  description, parameters; parameters: type, $defs, items, required, properties; property: anyOf,
  type, items, description, enum, properties, required), ``description`` always present;
- property names are sorted at every level, every other JSON object (``items``, ``$defs``, ``enum``
  values, call arguments) has its keys sorted recursively; integral floats become ints;
- schema keywords Ollama's ``api.ToolProperty`` does not keep (``default``, ``minimum``, ...) are
  dropped (Ollama drops them when a request arrives).

That is what Ollama hands a TEMPLATE whatever order a request had (it turns properties and
arguments into Go maps, which print sorted), so a model trained on the canonical text sees the same
text behind Ollama. Strings and numbers that Go cannot print the way ``json.dumps`` did are reported
(see :func:`ollama_differences`). The format is documented in README ("Tool calling").
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from ..gotemplate.values import go_json_float, strconv_quote
from .problems import Problem

PROPERTY_KEYS = ("anyOf", "type", "items", "description", "enum", "properties", "required")
PARAMETER_KEYS = ("type", "$defs", "items", "required", "properties")
JSON_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
CANONICAL_FORM = ("Ollama struct-field order; property names sorted at every level; items/$defs/enum values and "
                  "call arguments with keys sorted recursively; integral floats as ints; schema keywords Ollama "
                  "drops are dropped; tool results as strings")
# ShareGPT-style function calling (LLaMA-Factory, glaive exports): role names of the call and result turns.
SHAREGPT_CALL_ROLES = ("function_call", "tool_call", "tool_calls")
SHAREGPT_RESULT_ROLES = ("observation",)


class Notes:
    """What canonicalisation did to one record (aggregated into the data card)."""

    def __init__(self):
        self.dropped: Counter = Counter()  # schema keyword -> times dropped
        self.converted: Counter = Counter()  # kind of conversion -> times
        self.calls = 0

    def as_dict(self) -> dict:
        return {"dropped": dict(self.dropped), "converted": dict(self.converted), "calls": self.calls}


def _json_value(v: Any, notes: Notes) -> Any:
    """A JSON value with object keys sorted recursively and integral floats as ints."""
    if isinstance(v, dict):
        return {k: _json_value(v[k], notes) for k in sorted(v)}
    if isinstance(v, list):
        return [_json_value(x, notes) for x in v]
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        notes.converted["integral float -> int"] += 1
        return int(v)
    return v


def _maybe_json(v: Any, what: str, field: str, notes: Notes) -> Any:
    if isinstance(v, str):
        try:
            parsed = json.loads(v)
        except ValueError as exc:
            raise Problem("bad_tools" if what == "tools" else "bad_tool_call",
                          f"{field} is a string but not JSON ({exc.msg} at char {exc.pos}); fix: give a JSON {what}", field) from None
        notes.converted[f"{what} given as a JSON string"] += 1
        return parsed
    return v


def _property(p: Any, field: str, notes: Notes) -> dict:
    if not isinstance(p, dict):
        raise Problem("bad_tools", f"{field} must be a JSON-schema object, got {type(p).__name__}; fix: e.g. "
                      '{"type": "string", "description": "..."}', field)
    out: dict = {}
    for k in p:
        if k not in PROPERTY_KEYS:
            notes.dropped[k] += 1
    if p.get("anyOf"):
        if not isinstance(p["anyOf"], list):
            raise Problem("bad_tools", f"{field}.anyOf must be a list of schemas", f"{field}.anyOf")
        out["anyOf"] = [_property(x, f"{field}.anyOf[{i}]", notes) for i, x in enumerate(p["anyOf"])]
    t = p.get("type")
    if t is not None:
        types = [t] if isinstance(t, str) else t
        if not isinstance(types, list) or not types or not all(isinstance(x, str) and x in JSON_TYPES for x in types):
            raise Problem("bad_tools", f"{field}.type = {t!r} is not a JSON-schema type (or list of them): "
                          f"use one of {', '.join(JSON_TYPES)}", f"{field}.type")
        out["type"] = types[0] if len(types) == 1 else list(types)
    if p.get("items") is not None:
        out["items"] = _json_value(p["items"], notes)
    d = p.get("description")
    if d is not None and not isinstance(d, str):
        raise Problem("bad_tools", f"{field}.description must be a string", f"{field}.description")
    if d:
        out["description"] = d
    if p.get("enum") is not None:
        if not isinstance(p["enum"], list):
            raise Problem("bad_tools", f"{field}.enum must be a list of values", f"{field}.enum")
        if p["enum"]:
            out["enum"] = _json_value(p["enum"], notes)
    if p.get("properties") is not None:
        out["properties"] = _properties(p["properties"], f"{field}.properties", notes)
    if p.get("required"):
        out["required"] = _required(p["required"], out.get("properties"), f"{field}.required")
    return out


def _properties(props: Any, field: str, notes: Notes) -> dict:
    if not isinstance(props, dict):
        raise Problem("bad_tools", f"{field} must be an object mapping argument names to schemas", field)
    return {k: _property(props[k], f"{field}.{k}", notes) for k in sorted(props)}


def _required(req: Any, props: dict | None, field: str) -> list:
    if not isinstance(req, list) or not all(isinstance(x, str) for x in req):
        raise Problem("bad_tools", f"{field} must be a list of property names", field)
    missing = [x for x in req if props is not None and x not in props]
    if missing:
        raise Problem("bad_tools", f"{field} names {', '.join(missing)}, which is not among the properties; "
                      "fix: declare it under properties or remove it from required", field)
    return list(req)


def canonical_tools(value: Any, notes: Notes, field: str = "tools") -> list[dict] | None:
    """The record's ``tools`` in canonical form (None when it declares none)."""
    value = _maybe_json(value, "tools", field, notes)
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise Problem("bad_tools", f"'{field}' must be a list of tools, got {type(value).__name__}", field)
    out, names = [], set()
    for i, t in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(t, dict):
            raise Problem("bad_tools", f"{f} must be an object", f)
        if "function" not in t and "name" in t:  # a bare function object (glaive/xlam style)
            t = {"type": "function", "function": t}
            notes.converted["bare function object wrapped"] += 1
        if t.get("type", "function") != "function":
            raise Problem("bad_tools", f"{f}.type = {t.get('type')!r}: only function tools are supported", f"{f}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise Problem("bad_tools", f"{f}.function must be an object with name, description, parameters", f"{f}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise Problem("bad_tools", f"{f}.function.name = {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . -",
                          f"{f}.function.name")
        if name in names:
            raise Problem("bad_tools", f"{f}: tool {name!r} is declared twice", f"{f}.function.name")
        names.add(name)
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise Problem("bad_tools", f"{f}.function.description must be a string", f"{f}.function.description")
        params = fn.get("parameters") or {}
        pf = f"{f}.function.parameters"
        if not isinstance(params, dict):
            raise Problem("bad_tools", f"{pf} must be a JSON-schema object", pf)
        if params.get("type", "object") != "object":
            raise Problem("bad_tools", f"{pf}.type must be \"object\", got {params.get('type')!r}", f"{pf}.type")
        for k in params:
            if k not in PARAMETER_KEYS:
                notes.dropped[k] += 1
        for k in fn:
            if k not in ("name", "description", "parameters"):
                notes.dropped[k] += 1
        p: dict = {"type": "object"}
        for k in ("$defs", "items"):
            if params.get(k) is not None:
                p[k] = _json_value(params[k], notes)
        props = _properties(params.get("properties") or {}, f"{pf}.properties", notes)
        if params.get("required"):
            p["required"] = _required(params["required"], props, f"{pf}.required")
        p["properties"] = props
        out.append({"type": "function", "function": {"name": name, "description": desc, "parameters": p}})
    return out


def _call(c: Any, field: str, declared: dict, notes: Notes) -> dict:
    if not isinstance(c, dict):
        raise Problem("bad_tool_call", f"{field} must be an object", field)
    fn = c.get("function") if isinstance(c.get("function"), dict) else c  # {"name", "arguments"} accepted
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise Problem("bad_tool_call", f"{field} has no function name", f"{field}.function.name")
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        raise Problem("bad_tool_call", f"{field} calls {name!r}, which the record's tools do not declare (declared: {known}); "
                      "fix: add the tool to 'tools' or correct the name", f"{field}.function.name")
    args = fn.get("arguments", fn.get("parameters", {}))
    args = _maybe_json(args, "arguments", f"{field}.function.arguments", notes)
    if not isinstance(args, dict):
        raise Problem("bad_tool_call", f"{field}.function.arguments must be a JSON object, got {type(args).__name__}",
                      f"{field}.function.arguments")
    out: dict = {}
    cid = c.get("id")
    if cid is not None:
        if not isinstance(cid, str) or not cid:
            raise Problem("bad_tool_call", f"{field}.id must be a non-empty string", f"{field}.id")
        out["id"] = cid
    out["type"] = "function"
    out["function"] = {"name": name, "arguments": _json_value(args, notes)}
    notes.calls += 1
    return out


def canonical_messages(messages: list[dict], tools: list[dict] | None, key: str, notes: Notes) -> list[dict]:
    """Canonical tool calls and results, checked against the declared tools and against each other."""
    declared = {t["function"]["name"]: t for t in tools or []}
    out: list[dict] = []
    pending: list[dict] = []  # calls of the last assistant turn not answered yet
    open_calls: list[dict] = []
    for i, m in enumerate(messages):
        f = f"{key}[{i}]"
        role = m["role"]
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not calls:
                raise Problem("bad_tool_call", f"{f}.tool_calls must be a non-empty list", f"{f}.tool_calls")
            canon = [_call(c, f"{f}.tool_calls[{j}]", declared, notes) for j, c in enumerate(calls)]
            ids = [c["id"] for c in canon if "id" in c]
            if len(ids) != len(set(ids)):
                raise Problem("bad_tool_call", f"{f}.tool_calls has duplicate ids", f"{f}.tool_calls")
            out.append({"role": "assistant", "content": m.get("content") or "", "tool_calls": canon})
            pending, open_calls = list(canon), list(canon)
            continue
        if role == "tool":
            if not open_calls:
                raise Problem("tool_order", f"{f}: a tool result with no tool call before it; fix: put the assistant turn "
                              "with tool_calls right before its results", f"{f}.role")
            if not pending:
                raise Problem("tool_order", f"{f}: more tool results than calls in {key}", f"{f}.role")
            msg: dict = {"role": "tool", "content": m["content"]}
            cid, name = m.get("tool_call_id"), m.get("name")
            if cid is not None:
                match = [c for c in pending if c.get("id") == cid]
                if not match:
                    known = ", ".join(repr(c["id"]) for c in open_calls if "id" in c) or "none"
                    raise Problem("tool_order", f"{f}.tool_call_id = {cid!r} matches no call of the assistant turn before it "
                                  f"(ids: {known})", f"{f}.tool_call_id")
                call = match[0]
                msg["tool_call_id"] = cid
            else:
                call = pending[0]
            if name is not None:
                if name != call["function"]["name"]:
                    raise Problem("tool_order", f"{f}.name = {name!r} but the call it answers is "
                                  f"{call['function']['name']!r}", f"{f}.name")
                msg["name"] = name
            pending.remove(call)
            out.append(msg)
            continue
        if role == "user":
            open_calls, pending = [], []
        out.append({"role": role, "content": m["content"]})
    return out


def tool_content(content: Any) -> Any:
    """A tool result given as a JSON object/array becomes its JSON text (templates print strings)."""
    if isinstance(content, (dict, list)) and not (content and all(isinstance(p, dict) and p.get("type") == "text" for p in content)):
        return json.dumps(content, ensure_ascii=False)
    return content


def sharegpt_turns(turns: Any) -> Any:
    """ShareGPT function calling -> turns ``_messages`` reads: a ``function_call`` turn (value: JSON
    ``{"name", "arguments"}`` or a list of them) becomes an assistant turn with ``tool_calls``; an
    ``observation`` turn becomes a ``tool`` turn."""
    if not isinstance(turns, list):
        return turns
    out = []
    for t in turns:
        role = t.get("from") if isinstance(t, dict) else None
        if isinstance(role, str) and role.strip().lower() in SHAREGPT_CALL_ROLES:
            v = t.get("value")
            try:
                parsed = json.loads(v) if isinstance(v, str) else v
            except ValueError:
                parsed = v  # reported by _call as "not JSON"
            calls = parsed if isinstance(parsed, list) else [parsed]
            out.append({"from": "assistant", "value": "", "tool_calls": calls})
        elif isinstance(role, str) and role.strip().lower() in SHAREGPT_RESULT_ROLES:
            out.append({**t, "from": "tool"})
        else:
            out.append(t)
    return out


def has_tool_turns(messages: list[dict]) -> bool:
    return any(m.get("tool_calls") is not None or m["role"] == "tool" for m in messages)


# ------------------------------------------------------------------- what Ollama cannot reproduce
def _walk(v: Any, path: str):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _walk(k, f"{path} key")
            yield from _walk(x, f"{path}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _walk(x, f"{path}[{i}]")
    else:
        yield path, v


def ollama_differences(tools: list[dict] | None, messages: list[dict], *, tool_results_quoted: bool = False) -> list[str]:
    """Values a TEMPLATE cannot print the way ``json.dumps`` printed them in training.

    Strings are printed with ``printf "%q"`` (``strconv.Quote``): identical to ``json.dumps(...,
    ensure_ascii=False)`` except for control characters other than ``\\n \\r \\t \\b \\f``, DEL and
    non-printable Unicode. Numbers arrive as float64 and are printed with ``json``: identical except
    for exponent forms (``1e-07``) and integers beyond 2**53.
    """
    found = []
    values = list(_walk(tools or [], "tools"))
    for i, m in enumerate(messages):
        for j, c in enumerate(m.get("tool_calls") or []):
            values += list(_walk(c["function"]["arguments"], f"messages[{i}].tool_calls[{j}].arguments"))
        if tool_results_quoted and m["role"] == "tool":
            values.append((f"messages[{i}].content", m["content"]))
    for path, v in values:
        if isinstance(v, str):
            if strconv_quote(v) != json.dumps(v, ensure_ascii=False):
                found.append(f"{path}: {v!r} has characters Go's %q escapes differently from json.dumps")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                shown = go_json_float(float(v)) if float(v) == v else "a rounded float64"
            except (ValueError, OverflowError):
                shown = "an error (json cannot encode it)"
            if shown != json.dumps(v):
                found.append(f"{path}: the number {json.dumps(v)} prints as {shown} in Ollama")
    return found


def summarise(records, chat_template: str | None = None, limit: int = 5) -> dict | None:
    """The data card's ``tools`` section: counts, what canonicalisation changed, and the records whose
    tool text Ollama cannot reproduce (``data prepare`` warns about those)."""
    with_tools = [r for r in records if getattr(r, "tool_notes", None) is not None]
    if not with_tools:
        return None
    from ..chat_families import detect_family

    fam = detect_family(chat_template) if chat_template else None
    quoted = fam is not None and fam.tools == "llama3-json"  # Llama prints tool results with tojson
    dropped: Counter = Counter()
    converted: Counter = Counter()
    differ = []
    for r in with_tools:
        dropped.update(r.tool_notes.dropped)
        converted.update(r.tool_notes.converted)
        for d in ollama_differences(r.tools, r.messages, tool_results_quoted=quoted):
            differ.append(f"{r.where}: {d}")
    return {
        "records_with_tools": sum(1 for r in with_tools if r.tools),
        "records_with_tool_calls": sum(1 for r in with_tools if r.tool_notes.calls),
        "tool_calls": sum(r.tool_notes.calls for r in with_tools),
        "parallel_call_turns": sum(1 for r in with_tools for m in r.messages if len(m.get("tool_calls") or []) > 1),
        "canonical_form": CANONICAL_FORM,
        "dropped_schema_keywords": dict(sorted(dropped.items())),
        "converted": dict(sorted(converted.items())),
        "family": fam.name if fam else None,
        "family_tool_syntax": (fam.tools or None) if fam else None,
        "not_reproducible_in_ollama": len(differ),
        "not_reproducible_examples": differ[:limit],
    }


def card_warnings(section: dict | None) -> list[str]:
    """What ``data validate``/``prepare`` warn about, from the card's ``tools`` section."""
    if not section:
        return []
    out = []
    if section["dropped_schema_keywords"]:
        kw = ", ".join(f"{k} x{v}" for k, v in section["dropped_schema_keywords"].items())
        out.append(f"tool schemas: dropped keywords Ollama does not keep ({kw})")
    if section["not_reproducible_in_ollama"]:
        out.append(f"{section['not_reproducible_in_ollama']} tool values print differently in Ollama, e.g. "
                   + section["not_reproducible_examples"][0])
    if section["family"] and not section["family_tool_syntax"]:
        out.append(f"the chat template (family {section['family']}) has no tool-call syntax: tools are not rendered")
    return out
