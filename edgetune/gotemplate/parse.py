"""Lexing and parsing for :mod:`edgetune.gotemplate` (the Go ``text/template`` subset Ollama
TEMPLATEs use): text and actions with trim markers, pipelines, block structure, and ``define``d
templates. Anything outside the subset raises :class:`GoTemplateError` naming the construct."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(ValueError):
    pass


_SPACE = " \t\r\n"


# ---------------------------------------------------------------------------------------- lexing
def _split(src: str) -> list[tuple[str, str]]:
    """Split into ("text", s) and ("action", s) pieces, applying trim markers."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        if start < 0:
            if text:
                pieces.append(("text", text))
            return pieces
        inner_start = start + 2
        if src.startswith("-", inner_start) and inner_start + 1 < len(src) and src[inner_start + 1] in _SPACE:
            text = text.rstrip(_SPACE)
            inner_start += 2
        if text:
            pieces.append(("text", text))
        end = _find_close(src, inner_start)
        inner = src[inner_start:end]
        trim_next = False
        if len(inner) >= 2 and inner.endswith("-") and inner[-2] in _SPACE:
            inner = inner[:-2]
            trim_next = True
        pieces.append(("action", inner.strip(_SPACE)))
        pos = end + 2


def _find_close(src: str, i: int) -> int:
    """Index of the ``}}`` closing an action, skipping string literals and comments."""
    n = len(src)
    while i < n:
        c = src[i]
        if src.startswith("/*", i):
            j = src.find("*/", i + 2)
            if j < 0:
                raise GoTemplateError("unclosed comment")
            i = j + 2
            continue
        if c == '"':
            i += 1
            while i < n and src[i] != '"':
                i += 2 if src[i] == "\\" else 1
            i += 1
            continue
        if c == "`":
            j = src.find("`", i + 1)
            if j < 0:
                raise GoTemplateError("unclosed raw string")
            i = j + 1
            continue
        if src.startswith("}}", i):
            return i
        i += 1
    raise GoTemplateError("unclosed action: missing }}")


_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<decl>:=)
    | (?P<assign>=)
    | (?P<lp>\()
    | (?P<rp>\))
    | (?P<pipe>\|)
    | (?P<comma>,)
    | (?P<var>\$[A-Za-z0-9_]*)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


def _tokens(s: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot parse action near {s[pos:pos + 20]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        # a field chain may follow a closing paren or a variable directly: (x).Role, $m.Content
        if kind in ("rp", "var") and pos < len(s) and s[pos] == ".":
            fm = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+").match(s, pos)
            if fm:
                out.append(("chain", fm.group(0)))
                pos = fm.end()
    return out


_GO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "'": "'"}


def go_unquote(lit: str) -> str:
    body = lit[1:-1]
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e in _GO_ESCAPES:
            out.append(_GO_ESCAPES[e])
            i += 2
        elif e in "uU":
            width = 4 if e == "u" else 8
            out.append(chr(int(body[i + 2 : i + 2 + width], 16)))
            i += 2 + width
        elif e == "x":
            out.append(chr(int(body[i + 2 : i + 4], 16)))
            i += 4
        else:
            raise GoTemplateError(f"unsupported escape \\{e} in {lit}")
    return "".join(out)


def go_quote(s: str) -> str:
    """A Go interpreted string literal for ``s`` (used to emit literal text that contains ``{{``)."""
    out = ['"']
    for c in s:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


# -------------------------------------------------------------------------------------- parsing
@dataclass
class Node:
    kind: str  # text | out | if | range | with | set | define | template
    value: Any = None  # text, or pipeline
    var: list[str] = field(default_factory=list)  # declared/assigned variable names
    declare: bool = True
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


def _parse_pipeline(toks: list[tuple[str, str]]):
    """Pipeline = command ('|' command)*; command = operand+ ; returns a nested tuple tree."""
    cmds = []
    cur: list = []
    i = 0
    while i < len(toks):
        kind, val = toks[i]
        if kind == "pipe":
            cmds.append(cur)
            cur = []
            i += 1
            continue
        if kind == "lp":
            depth = 1
            j = i + 1
            while j < len(toks) and depth:
                depth += {"lp": 1, "rp": -1}.get(toks[j][0], 0)
                j += 1
            if depth:
                raise GoTemplateError("unbalanced parentheses")
            node = ("paren", _parse_pipeline(toks[i + 1 : j - 1]))
            i = j
            if i < len(toks) and toks[i][0] == "chain":
                node = ("chain", node, toks[i][1][1:].split("."))
                i += 1
            cur.append(node)
            continue
        if kind == "var" and i + 1 < len(toks) and toks[i + 1][0] == "chain":
            cur.append(("chain", ("var", val), toks[i + 1][1][1:].split(".")))
            i += 2
            continue
        if kind in ("str",):
            cur.append(("lit", go_unquote(val)))
        elif kind == "raw":
            cur.append(("lit", val[1:-1]))
        elif kind == "num":
            cur.append(("lit", float(val) if "." in val else int(val)))
        elif kind == "var":
            cur.append(("var", val))
        elif kind == "field":
            cur.append(("field", [] if val == "." else val[1:].split(".")))
        elif kind == "ident":
            if val in ("true", "false"):
                cur.append(("lit", val == "true"))
            elif val == "nil":
                cur.append(("lit", None))
            else:
                cur.append(("func", val))
        else:
            raise GoTemplateError(f"unexpected {val!r} in pipeline")
        i += 1
    cmds.append(cur)
    if any(not c for c in cmds):
        raise GoTemplateError("empty command in pipeline")
    return ("pipeline", cmds)


def _parse_decl(toks):
    """Split off a ``$a, $b :=`` / ``$a =`` prefix."""
    names = []
    i = 0
    while i < len(toks) and toks[i][0] == "var":
        names.append(toks[i][1])
        if i + 1 < len(toks) and toks[i + 1][0] == "comma":
            i += 2
            continue
        if i + 1 < len(toks) and toks[i + 1][0] in ("decl", "assign"):
            return names, toks[i + 1][0] == "decl", toks[i + 2 :]
        break
    return [], True, toks


class Tree(list):
    """The main template's nodes, with the ``define``d templates beside them (name -> nodes)."""

    def __init__(self, nodes=()):
        super().__init__(nodes)
        self.templates: dict[str, list[Node]] = {}


def parse(src: str) -> Tree:
    pieces = _split(src)
    root = Tree()
    stack: list[tuple[Node, list[Node]]] = []  # (block node, list currently appended to)
    target = root
    for kind, s in pieces:
        if kind == "text":
            target.append(Node("text", s))
            continue
        if s.startswith("/*"):
            continue
        toks = _tokens(s)
        if not toks:
            raise GoTemplateError("empty action {{ }}")
        head = toks[0][1] if toks[0][0] == "ident" else None
        if head in ("if", "range", "with"):
            names, declare, rest = _parse_decl(toks[1:]) if head != "if" else ([], True, toks[1:])
            node = Node(head, _parse_pipeline(rest), var=names, declare=declare)
            target.append(node)
            stack.append((node, target))
            target = node.body
        elif head == "else":
            if not stack:
                raise GoTemplateError("{{ else }} without a block")
            node, _outer = stack[-1]
            if len(toks) > 1 and toks[1][1] == "if":  # else if: a nested if inside orelse
                inner = Node("if", _parse_pipeline(toks[2:]))
                inner.chained = True  # type: ignore[attr-defined]
                node.orelse.append(inner)
                stack.append((inner, node.orelse))
                target = inner.body
            else:
                target = node.orelse
        elif head == "end":
            if not stack:
                raise GoTemplateError("{{ end }} without a block")
            node, outer = stack.pop()
            while getattr(node, "chained", False):  # close every "else if" with the one end
                node, outer = stack.pop()
            target = outer
        elif head == "define":
            if stack or len(toks) != 2 or toks[1][0] not in ("str", "raw"):
                raise GoTemplateError('{{ define "name" }} must stand at the top level with one quoted name')
            name = go_unquote(toks[1][1]) if toks[1][0] == "str" else toks[1][1][1:-1]
            node = Node("define", name)
            root.templates[name] = node.body
            stack.append((node, target))
            target = node.body
        elif head == "template":
            if len(toks) < 2 or toks[1][0] not in ("str", "raw"):
                raise GoTemplateError('{{ template "name" pipeline }} needs a quoted template name')
            name = go_unquote(toks[1][1]) if toks[1][0] == "str" else toks[1][1][1:-1]
            target.append(Node("template", _parse_pipeline(toks[2:]) if len(toks) > 2 else None, var=[name]))
        elif head in ("block", "break", "continue"):
            raise GoTemplateError(f"'{head}' is not supported by edgetune's template renderer")
        else:
            names, declare, rest = _parse_decl(toks)
            if names:
                target.append(Node("set", _parse_pipeline(rest), var=names, declare=declare))
            else:
                target.append(Node("out", _parse_pipeline(toks)))
    if stack:
        raise GoTemplateError(f"unclosed {{{{ {stack[-1][0].kind} }}}} block (missing {{{{ end }}}})")
    return root


def uses_field(src: str, name: str) -> bool:
    return re.search(r"\.\b" + re.escape(name) + r"\b", src) is not None
