"""A small interpreter for the subset of Go's ``text/template`` that Ollama chat templates use.

Hand-written because no maintained Python library renders Go templates, and ``ollama check``
must render a Modelfile's TEMPLATE offline (there is no Ollama binary on most CI machines).
Supported: text, ``{{- … -}}`` trim markers, comments, ``if``/``else if``/``else``/``end``,
``range [$i, $v :=] …`` (with ``else``), ``with``, variables (``$``, ``$x := …``, ``$x = …``),
field chains (``.Role``, ``$.Messages``, ``(index .Messages 0).Role``), pipelines with ``|``,
string / raw string / number / bool literals and the builtins ``eq ne lt le gt ge and or not len
index slice print printf``. Anything else raises :class:`GoTemplateError` naming the construct,
so an unsupported template is reported, never silently mis-rendered.
"""

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
    kind: str  # text | out | if | range | with | set
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


def parse(src: str) -> list[Node]:
    pieces = _split(src)
    root: list[Node] = []
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
        elif head in ("define", "template", "block", "break", "continue"):
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


# ------------------------------------------------------------------------------------ execution
def truth(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float, str, list, tuple, dict)) and not isinstance(v, bool):
        return len(v) > 0 if isinstance(v, (str, list, tuple, dict)) else v != 0
    return True


def _fmt(v: Any) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _cmp_ok(a, b):
    if isinstance(a, bool) != isinstance(b, bool) or isinstance(a, str) != isinstance(b, str):
        raise GoTemplateError(f"incompatible types for comparison: {a!r} and {b!r}")


def _eq(a, *bs):
    if not bs:
        raise GoTemplateError("eq needs two arguments")
    for b in bs:
        if a is not None and b is not None:
            _cmp_ok(a, b)
        if a == b:
            return True
    return False


def _printf(fmt, *args):
    out = []
    it = iter(args)
    i = 0
    while i < len(fmt):
        if fmt[i] == "%" and i + 1 < len(fmt):
            verb = fmt[i + 1]
            i += 2
            if verb == "%":
                out.append("%")
            elif verb in "sdv":
                out.append(_fmt(next(it)))
            elif verb == "c":
                out.append(chr(next(it)))
            elif verb == "q":
                out.append(go_quote(next(it)))
            else:
                raise GoTemplateError(f"printf verb %{verb} is not supported")
        else:
            out.append(fmt[i])
            i += 1
    return "".join(out)


def _slice(x, *idx):
    if len(idx) == 0:
        return x
    if len(idx) == 1:
        return x[idx[0]:]
    return x[idx[0] : idx[1]]


def _index(x, *keys):
    for k in keys:
        try:
            x = x[k]
        except (IndexError, KeyError, TypeError):
            raise GoTemplateError(f"index {k!r} out of range") from None
    return x


FUNCS = {
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "not": lambda a: not truth(a),
    "len": lambda a: len(a),
    "index": _index,
    "slice": _slice,
    "print": lambda *a: "".join(_fmt(x) for x in a),
    "printf": _printf,
}

# Fields of Ollama's api.Message that a template may read; absent ones render as their zero value.
MESSAGE_FIELDS = {"Role": "", "Content": "", "Thinking": "", "Images": None, "ToolCalls": None, "ToolName": ""}


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        if name in MESSAGE_FIELDS:
            return MESSAGE_FIELDS[name]
        raise GoTemplateError(f"can't evaluate field {name}")
    raise GoTemplateError(f"can't evaluate field {name} in type {type(obj).__name__}")


class _Scope:
    def __init__(self, root: Any):
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name):
        for f in reversed(self.frames):
            if name in f:
                return f[name]
        raise GoTemplateError(f"undefined variable {name}")

    def set(self, name, value, declare):
        if declare:
            self.frames[-1][name] = value
            return
        for f in reversed(self.frames):
            if name in f:
                f[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")


def _eval_arg(node, dot, scope):
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "var":
        return scope.get(node[1])
    if kind == "field":
        v = dot
        for name in node[1]:
            v = _field(v, name)
        return v
    if kind == "paren":
        return _eval_pipeline(node[1], dot, scope)
    if kind == "chain":
        v = _eval_arg(node[1], dot, scope)
        for name in node[2]:
            v = _field(v, name)
        return v
    if kind == "func":
        return _call(node[1], [], dot, scope)
    raise GoTemplateError(f"bad node {node!r}")


def _call(name, args, dot, scope, final=None):
    if name in ("and", "or"):
        vals = args + ([final] if final is not None else [])
        v = None
        for a in vals:  # short-circuit like Go >= 1.18
            v = _eval_arg(a, dot, scope) if isinstance(a, tuple) else a
            if (name == "and") != truth(v):
                return v
        return v
    if name not in FUNCS:
        raise GoTemplateError(f"function {name!r} is not supported by edgetune's template renderer")
    vals = [_eval_arg(a, dot, scope) for a in args]
    if final is not None:
        vals.append(final)
    try:
        return FUNCS[name](*vals)
    except TypeError as exc:
        raise GoTemplateError(f"wrong arguments for {name}: {exc}") from None


def _eval_pipeline(pipe, dot, scope):
    value = None
    for n, cmd in enumerate(pipe[1]):
        first = cmd[0]
        has_final = n > 0
        if first[0] == "func":
            value = _call(first[1], cmd[1:], dot, scope, final=value if has_final else None)
        else:
            if len(cmd) > 1 or has_final:
                raise GoTemplateError("can't give arguments to a non-function")
            value = _eval_arg(first, dot, scope)
    return value


def _exec(nodes, dot, scope, out):
    for node in nodes:
        k = node.kind
        if k == "text":
            out.append(node.value)
        elif k == "out":
            out.append(_fmt(_eval_pipeline(node.value, dot, scope)))
        elif k == "set":
            scope.set(node.var[0], _eval_pipeline(node.value, dot, scope), node.declare)
        elif k in ("if", "with"):
            v = _eval_pipeline(node.value, dot, scope)
            scope.frames.append({})
            try:
                if truth(v):
                    _exec(node.body, v if k == "with" else dot, scope, out)
                else:
                    _exec(node.orelse, dot, scope, out)
            finally:
                scope.frames.pop()
        elif k == "range":
            seq = _eval_pipeline(node.value, dot, scope)
            items = list(enumerate(seq)) if isinstance(seq, (list, tuple)) else list((seq or {}).items())
            if not items:
                scope.frames.append({})
                _exec(node.orelse, dot, scope, out)
                scope.frames.pop()
            for key, item in items:
                frame: dict[str, Any] = {}
                if len(node.var) == 1:
                    frame[node.var[0]] = item
                elif len(node.var) == 2:
                    frame[node.var[0]], frame[node.var[1]] = key, item
                scope.frames.append(frame)
                try:
                    _exec(node.body, item, scope, out)
                finally:
                    scope.frames.pop()


def _mentions_field(pipe, name: str) -> bool:
    def walk(node) -> bool:
        if node[0] == "field":
            return name in node[1]
        if node[0] == "paren":
            return _mentions_field(node[1], name)
        if node[0] == "chain":
            return walk(node[1])
        return False

    return any(walk(arg) for cmd in pipe[1] for arg in cmd)


def cut_after(nodes: list[Node], name: str) -> list[Node]:
    """Ollama's legacy-template trick for the last turn (template.go ``deleteNode``): keep the tree
    up to and including the first action that prints ``.Response``, delete everything after it
    (block conditions are not inspected, only the actions inside blocks)."""
    cut = False

    def walk(ns: list[Node]) -> list[Node]:
        nonlocal cut
        kept = []
        for n in ns:
            if cut:
                continue
            if n.kind in ("out", "set"):
                if _mentions_field(n.value, name):
                    cut = True
                kept.append(n)
            elif n.kind in ("if", "range", "with"):
                m = Node(n.kind, n.value, n.var, n.declare)
                m.body = walk(n.body)
                m.orelse = walk(n.orelse)
                kept.append(m)
            else:
                kept.append(n)
        return kept

    return walk(nodes)


def render_tree(tree: list[Node], data: dict[str, Any]) -> str:
    out: list[str] = []
    _exec(tree, data, _Scope(data), out)
    return "".join(out)


def render(src: str, data: dict[str, Any]) -> str:
    """Render Go-template ``src`` with ``data`` (Ollama passes ``System``, ``Messages``, ``Tools``…)."""
    tree = parse(src)
    out: list[str] = []
    _exec(tree, data, _Scope(data), out)
    return "".join(out)
