"""A small interpreter for the subset of Go's ``text/template`` that Ollama chat templates use.

Hand-written because no maintained Python library renders Go templates, and ``ollama check``
must render a Modelfile's TEMPLATE offline (there is no Ollama binary on most CI machines).
Supported: text, ``{{- … -}}`` trim markers, comments, ``if``/``else if``/``else``/``end``,
``range [$i, $v :=] …`` (with ``else``; maps in sorted key order), ``with``, variables (``$``,
``$x := …``, ``$x = …``), field chains (``.Role``, ``$.Messages``, ``(index .Messages 0).Role``),
pipelines with ``|``, string / raw string / number / bool literals, ``define``/``template`` (with
recursion), the builtins ``eq ne lt le gt ge and or not len index slice print printf`` (verbs
``%s %d %v %c %q %T %%``) and Ollama's ``json``. Values follow Go's rules (:mod:`.values`: Ollama's
tool types, ``%q`` = strconv.Quote, float64 printing). Anything else raises :class:`GoTemplateError`
naming the construct, so an unsupported template is reported, never silently mis-rendered.
"""

from __future__ import annotations

from typing import Any

from .parse import GoTemplateError, Node, Tree, go_quote, go_unquote, parse, uses_field
from .values import GoStruct, go_fmt_float, go_json, go_type, strconv_quote

__all__ = ["GoTemplateError", "Node", "go_quote", "go_unquote", "parse", "uses_field", "render", "render_tree", "cut_after"]


# ------------------------------------------------------------------------------------ execution
def truth(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, GoStruct):  # a struct, or a non-nil pointer to one, is always true
        return True
    if isinstance(v, (int, float, str, list, tuple, dict)) and not isinstance(v, bool):
        return len(v) > 0 if isinstance(v, (str, list, tuple, dict)) else v != 0
    return True


def _fmt(v: Any) -> str:
    """What ``{{ . }}`` prints (fmt's ``%v``; a ``String()`` method wins, as in Go)."""
    if getattr(v, "stringer", None) is not None:
        return v.stringer(v)
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return go_fmt_float(v)
    if isinstance(v, GoStruct):
        raise GoTemplateError(f"printing a {v.type_name} value is not supported (print its fields)")
    if isinstance(v, list):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{_fmt(v[k])}" for k in sorted(v)) + "]"
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
                a = next(it)
                if not isinstance(a, str):
                    raise GoTemplateError(f"printf %q of a {go_type(a)} is not supported")
                out.append(strconv_quote(a))
            elif verb == "T":
                out.append(go_type(next(it)))
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
        if isinstance(x, dict) and not isinstance(x, GoStruct):
            x = x.get(k)  # a missing map key gives the zero value, as in Go
            continue
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
    "json": go_json,  # Ollama's template func: encoding/json.Marshal
}

# Fields of Ollama's api.Message that a template may read; absent ones render as their zero value.
MESSAGE_FIELDS = {"Role": "", "Content": "", "Thinking": "", "Images": None, "ToolCalls": None, "ToolName": ""}


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, GoStruct):
        if name in obj:
            return obj[name]
        if name in obj.methods:
            return obj.methods[name]()
        raise GoTemplateError(f"can't evaluate field {name} in type {obj.type_name}")
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        if name in MESSAGE_FIELDS:
            return MESSAGE_FIELDS[name]
        raise GoTemplateError(f"can't evaluate field {name}")
    raise GoTemplateError(f"can't evaluate field {name} in type {type(obj).__name__}")


class _Scope:
    def __init__(self, root: Any, templates: dict | None = None, depth: int = 0):
        self.frames: list[dict[str, Any]] = [{"$": root}]
        self.templates = templates or {}
        self.depth = depth

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


MAX_DEPTH = 200  # nested {{ template }} calls (Go allows 100000; a deeper schema is a broken one)


def _exec(nodes, dot, scope, out):
    for node in nodes:
        k = node.kind
        if k == "text":
            out.append(node.value)
        elif k == "out":
            out.append(_fmt(_eval_pipeline(node.value, dot, scope)))
        elif k == "set":
            scope.set(node.var[0], _eval_pipeline(node.value, dot, scope), node.declare)
        elif k == "template":
            name = node.var[0]
            if name not in scope.templates:
                raise GoTemplateError(f'no such template "{name}"')
            if scope.depth >= MAX_DEPTH:
                raise GoTemplateError(f'template "{name}" nests deeper than {MAX_DEPTH} levels')
            arg = _eval_pipeline(node.value, dot, scope) if node.value is not None else None
            _exec(scope.templates[name], arg, _Scope(arg, scope.templates, scope.depth + 1), out)
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
            if isinstance(seq, GoStruct) or not isinstance(seq, (list, tuple, dict, type(None))):
                raise GoTemplateError(f"range can't iterate over {go_type(seq)}")
            # a Go map is visited in sorted key order
            items = list(enumerate(seq)) if isinstance(seq, (list, tuple)) else [(k, seq[k]) for k in sorted(seq or {})]
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

    kept = Tree(walk(nodes))
    kept.templates = getattr(nodes, "templates", {})
    return kept


def render_tree(tree: list[Node], data: dict[str, Any]) -> str:
    out: list[str] = []
    _exec(tree, data, _Scope(data, getattr(tree, "templates", None)), out)
    return "".join(out)


def render(src: str, data: dict[str, Any]) -> str:
    """Render Go-template ``src`` with ``data`` (Ollama passes ``System``, ``Messages``, ``Tools``…)."""
    return render_tree(parse(src), data)
