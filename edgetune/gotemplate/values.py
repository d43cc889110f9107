"""The values Ollama hands a chat TEMPLATE, modelled in Python: Go's formatting and Ollama's tool types.

Ollama does not give a template the request's JSON: it decodes it into Go structs and maps and, for
``.Messages`` templates, converts tools and tool calls (source: ollama template/template.go
``convertToolsForTemplate`` / ``convertMessagesForTemplate``, api/types.go ``Tool``, ``ToolProperty``,
``PropertyType``, ``ToolCall``). What a template prints then follows Go's rules: ``range`` over a map
visits keys sorted, ``json`` is ``encoding/json.Marshal`` (compact, ``<>&`` escaped, map keys sorted,
struct fields in declaration order), ``printf "%q"`` is ``strconv.Quote``, ``{{ . }}`` on a float64 is
``%v``. This module reproduces those rules so that :mod:`edgetune.gotemplate` renders a TEMPLATE
the way Ollama does, and so the data stage can tell which strings and numbers Ollama can print the way
the training template did. Hand-written: no Python library models Go's text/template values.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any


# ------------------------------------------------------------------------------ Go-typed values
class GoStruct(dict):
    """A Go struct value: named fields (a dict, so tests can compare it), a type name for ``%T``,
    its ``encoding/json`` shape, an optional ``String()`` and methods callable as fields."""

    def __init__(self, type_name: str, fields: dict, *, json_fields: tuple = (), stringer=None, methods=None, marshal=None):
        super().__init__(fields)
        self.type_name = type_name
        self.json_fields = json_fields  # ((json name, field name, omitempty), ...)
        self.stringer = stringer
        self.methods = methods or {}
        self.marshal = marshal


class GoMap(dict):
    """A named Go map type (``map[string]api.ToolProperty``, ``template.templateArgs``)."""

    def __init__(self, type_name: str, items: dict, *, stringer=None, ordered: bool = False):
        super().__init__(items)
        self.type_name = type_name
        self.stringer = stringer
        self.ordered = ordered  # JSON in insertion order (an ordered map type), not sorted


class GoSlice(list):
    """A named Go slice type (``api.PropertyType``, ``[]string``, ``[]api.ToolProperty``)."""

    def __init__(self, type_name: str, items, *, stringer=None, marshal=None):
        super().__init__(items)
        self.type_name = type_name
        self.stringer = stringer
        self.marshal = marshal


def go_type(v: Any) -> str:
    """What ``printf "%T"`` prints for a value."""
    if isinstance(v, (GoStruct, GoMap, GoSlice)):
        return v.type_name
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, dict):
        return "map[string]interface {}"
    if isinstance(v, list):
        return "[]interface {}"
    return type(v).__name__


# ------------------------------------------------------------------------------ Go formatting
def _go_printable(c: str) -> bool:
    # unicode.IsPrint: letters, marks, numbers, punctuation, symbols and ASCII space — the same set
    # as Python's str.isprintable() (which excludes Cc, Cf, Cs, Co, Cn, Zl, Zp and Zs but space)
    return c.isprintable()


_QUOTE_ESC = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v", '"': '\\"', "\\": "\\\\"}


def strconv_quote(s: str) -> str:
    """Go's ``strconv.Quote`` (what ``printf "%q"`` prints for a string)."""
    out = ['"']
    for c in s:
        if c in _QUOTE_ESC:
            out.append(_QUOTE_ESC[c])
        elif _go_printable(c):
            out.append(c)
        elif ord(c) < 0x80:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    out.append('"')
    return "".join(out)


def _shortest_digits(f: float) -> tuple[str, int]:
    """(digits, decimal exponent) of the shortest round-tripping representation of ``f`` (> 0)."""
    sign, digits, exp = Decimal(repr(f)).as_tuple()
    ds = "".join(map(str, digits)).rstrip("0") or "0"
    return ds, exp + len("".join(map(str, digits))) - 1


def go_fmt_float(f: float) -> str:
    """``fmt`` ``%v`` of a float64: ``%g`` with the shortest digits, exponent form when exp < -4 or >= 6
    (strconv uses precision 6 for that decision when printing the shortest digits: 1e6 prints ``1e+06``)."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    ds, e = _shortest_digits(abs(f))
    sign = "-" if f < 0 else ""
    if e < -4 or e >= 6:
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{sign}{mant}e{'-' if e < 0 else '+'}{abs(e):02d}"
    return sign + format(Decimal(ds).scaleb(e - len(ds) + 1), "f")


def go_json_float(f: float) -> str:
    """``encoding/json`` for a float64: fixed notation, exponent form below 1e-6 or from 1e21 (``1e-7``)."""
    if f != f or f in (math.inf, -math.inf):
        raise ValueError("json: unsupported value")
    a = abs(f)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        ds, e = _shortest_digits(a)
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{'-' if f < 0 else ''}{mant}e{'-' if e < 0 else '+'}{abs(e)}"
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    ds, e = _shortest_digits(a)
    return ("-" if f < 0 else "") + format(Decimal(ds).scaleb(e - len(ds) + 1), "f")


_JSON_ESC = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
             "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_json_string(s: str) -> str:
    return '"' + "".join(_JSON_ESC.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 else c) for c in s) + '"'


def _empty(x: Any) -> bool:
    """encoding/json ``omitempty``: false, 0, "", nil, and empty slices/maps (a struct pointer only when nil)."""
    if x is None or x is False or x == "":
        return True
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x == 0
    return isinstance(x, (list, dict)) and not isinstance(x, GoStruct) and not x


def go_json(v: Any) -> str:
    """Go's ``json.Marshal`` of a template value (what Ollama's ``json`` function returns)."""
    if isinstance(v, GoStruct):
        if v.marshal is not None:
            return v.marshal()
        parts = []
        for jname, fname, omitempty in v.json_fields:
            x = v.get(fname)
            if omitempty and _empty(x):
                continue
            parts.append(go_json_string(jname) + ":" + go_json(x))
        return "{" + ",".join(parts) + "}"
    if isinstance(v, GoSlice) and v.marshal is not None:
        return v.marshal(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return go_json_float(v)
    if isinstance(v, str):
        return go_json_string(v)
    if isinstance(v, dict):
        keys = list(v) if getattr(v, "ordered", False) else sorted(v)
        return "{" + ",".join(go_json_string(k) + ":" + go_json(v[k]) for k in keys) + "}"
    if isinstance(v, list):
        return "[" + ",".join(go_json(x) for x in v) + "]"
    raise ValueError(f"json: unsupported type {type(v).__name__}")


# ------------------------------------------------------------------------------ Ollama's tool types
def _decoded(v: Any) -> Any:
    """A JSON value as Go's ``encoding/json`` decodes it into ``any``: numbers become float64."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        return {k: _decoded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decoded(x) for x in v]
    return v


def _strings(v) -> GoSlice | None:
    return GoSlice("[]string", v) if v else None


def _property_type(t) -> GoSlice | None:
    if t is None:
        return None
    items = [t] if isinstance(t, str) else list(t)

    def marshal(s):
        return go_json(s[0]) if len(s) == 1 else "[" + ",".join(go_json(x) for x in s) + "]"

    def string(s):
        return "" if not s else s[0] if len(s) == 1 else "[" + " ".join(s) + "]"

    return GoSlice("api.PropertyType", items, stringer=string, marshal=marshal)


_PROPERTY_JSON = (("anyOf", "AnyOf", True), ("type", "Type", True), ("items", "Items", True),
                  ("description", "Description", True), ("enum", "Enum", True),
                  ("properties", "Properties", True), ("required", "Required", True))


def _properties_map(props: dict | None) -> GoStruct | None:
    """``*api.ToolPropertiesMap`` (insertion-ordered; ``.ToMap`` gives a plain, sorted-ranging map)."""
    if props is None:
        return None
    converted = {k: tool_property(v) for k, v in props.items()}
    ordered = GoMap("map[string]api.ToolProperty", converted, ordered=True)
    return GoStruct("*api.ToolPropertiesMap", {}, marshal=lambda: go_json(ordered),
                    methods={"ToMap": lambda: GoMap("map[string]api.ToolProperty", converted)})


def tool_property(p: dict) -> GoStruct:
    """``api.ToolProperty`` from a JSON-schema property (unknown keywords are dropped, as Go's decoder does)."""
    p = p if isinstance(p, dict) else {}
    any_of = p.get("anyOf")
    fields = {
        "AnyOf": GoSlice("[]api.ToolProperty", [tool_property(x) for x in any_of]) if any_of else None,
        "Type": _property_type(p.get("type")),
        "Items": _decoded(p.get("items")),
        "Description": p.get("description") or "",
        "Enum": _decoded(p["enum"]) if p.get("enum") else None,
        "Properties": _properties_map(p.get("properties")) if isinstance(p.get("properties"), dict) else None,
        "Required": _strings(p.get("required")),
    }
    return GoStruct("api.ToolProperty", fields, json_fields=_PROPERTY_JSON)


def template_tools(tools: list[dict] | None) -> GoSlice | None:
    """Ollama's ``convertToolsForTemplate``: ``.Tools`` as a template sees it."""
    if not tools:
        return None
    out = []
    for t in tools:
        fn = t.get("function") or {}
        params = fn.get("parameters") or {}
        props = params.get("properties")
        p = GoStruct("template.templateToolFunctionParameters", {
            "Type": params.get("type") or "",
            "Defs": _decoded(params.get("$defs")),
            "Items": _decoded(params.get("items")),
            "Required": _strings(params.get("required")),
            "Properties": GoMap("template.templateProperties", {k: tool_property(v) for k, v in (props or {}).items()},
                                stringer=lambda m: go_json(m) if m else "{}"),
        }, json_fields=(("type", "Type", False), ("$defs", "Defs", True), ("items", "Items", True),
                        ("required", "Required", True), ("properties", "Properties", False)))
        f = GoStruct("template.templateToolFunction", {"Name": fn.get("name") or "", "Description": fn.get("description") or "",
                                                       "Parameters": p},
                     json_fields=(("name", "Name", False), ("description", "Description", False), ("parameters", "Parameters", False)))
        tool = GoStruct("template.templateTool", {"Type": t.get("type") or "", "Items": _decoded(t.get("items")), "Function": f},
                        json_fields=(("type", "Type", False), ("items", "Items", True), ("function", "Function", False)))
        tool.stringer = lambda s: go_json(s)
        out.append(tool)
    return GoSlice("template.templateTools", out, stringer=lambda s: go_json(list(s)))


def template_tool_calls(calls: list[dict] | None) -> GoSlice | None:
    """An assistant message's ``.ToolCalls``: ID and Function{Index, Name, Arguments (a plain map)}."""
    if not calls:
        return None
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function") or {}
        args = fn.get("arguments")
        if isinstance(args, str):
            args = json.loads(args)
        amap = GoMap("template.templateArgs", _decoded(args or {}), stringer=lambda m: go_json(m) if m else "{}")
        out.append(GoStruct("template.templateToolCall", {
            "ID": c.get("id") or "",
            "Function": GoStruct("template.templateToolCallFunction", {"Index": fn.get("index", i) if isinstance(fn.get("index"), int) else 0,
                                                                       "Name": fn.get("name") or "", "Arguments": amap}),
        }))
    return GoSlice("[]template.templateToolCall", out)


def template_message(m: dict) -> GoStruct:
    """``template.templateMessage``: the fields a TEMPLATE can read from one (collated) message."""
    return GoStruct("*template.templateMessage", {
        "Role": m.get("role", ""), "Content": m.get("content") or "", "Thinking": m.get("thinking") or m.get("reasoning_content") or "",
        "Images": None, "ToolCalls": template_tool_calls(m.get("tool_calls")),
        "ToolName": m.get("tool_name") or m.get("name") or "", "ToolCallID": m.get("tool_call_id") or "",
    })

