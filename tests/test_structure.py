"""Properties of the code base itself: every flag a fix or hint names exists, the package imports no
circle and no layer imports a higher one, test modules share helpers through conftest.py only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest

from edgetune.cli import cli
from edgetune.devdocs import LAYERS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgetune"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# `edgetune CMD [SUB] ...` inside a text, up to the end of that command line
COMMAND = re.compile(r"edgetune((?: [a-z][a-z0-9-]*)+)([^`'\";\n]*)")


def _commands() -> dict[tuple[str, ...], set[str]]:
    """Every command path (() = the group itself) -> its long options, loading each lazy command."""
    found: dict[tuple[str, ...], set[str]] = {}

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        ctx = click.Context(cmd, info_name=" ".join(("edgetune", *path)))
        found[path] = {o for p in cmd.get_params(ctx) for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), (*path, name))

    walk(cli, ())
    return found


def _texts(value: ast.AST, constants: dict[str, str]) -> list[str]:
    """The literal text of an expression: string constants and f-string parts, module constants by name."""
    texts = []
    for node in ast.walk(value):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
        elif isinstance(node, ast.Name) and node.id in constants:
            texts.append(constants[node.id])
    return texts


def fix_and_hint_texts() -> list[tuple[str, str]]:
    """(file:line, text) of every ``fix=`` argument and every string appended to a ``*hints`` list."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                     for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            values = [k.value for k in node.keywords if k.arg == "fix"]
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "append" and "hint" in ast.unparse(func.value):
                values += node.args
            for v in values:
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found += [(where, "".join(_texts(v, constants)))]
    return found


def test_fix_and_hint_texts_are_found():
    texts = fix_and_hint_texts()
    assert len(texts) > 50
    assert any("--resume" in t for _, t in texts) and any("--max-seq-len" in t for _, t in texts)


def test_every_flag_in_a_fix_or_hint_exists():
    """A fix that names a flag names one some command has; after `edgetune CMD`, one CMD has."""
    commands = _commands()
    everywhere = set().union(*commands.values())
    stale = []
    for where, text in fix_and_hint_texts():
        stale += [f"{where}: {flag} in {text!r}" for flag in FLAG.findall(text) if flag not in everywhere]
        for m in COMMAND.finditer(text):
            words = tuple(m.group(1).split())
            path = max((words[:i] for i in range(len(words) + 1) if words[:i] in commands), key=len)
            if not path:
                continue  # `edgetune` followed by something that is not a command (e.g. a package extra)
            tail = " ".join(words[len(path):]) + m.group(2)
            # a group's one-shot form (`edgetune export MODEL_DIR --quant q4_k_m`) runs one of its commands
            allowed = set().union(*(opts for p, opts in commands.items() if p[:len(path)] == path))
            stale += [f"{where}: `edgetune {' '.join(path)}` has no {flag} ({text!r})"
                      for flag in FLAG.findall(tail) if flag not in allowed]
    assert not stale, "\n".join(stale)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """edgetune module -> the edgetune modules it imports anywhere (top level or inside a function).

    ``from PKG import name`` counts as importing the module ``PKG.name`` when there is one, else ``PKG``."""
    files = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                if base == "edgetune" or base.startswith("edgetune."):
                    deps.update(known(f"{base}.{a.name}") if f"{base}.{a.name}" in files else known(base)
                                for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(known(a.name) for a in node.names if a.name.startswith("edgetune"))
        graph[mod] = {d for d in deps if d and d != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (``[a, b, ..., a]``), or None."""
    done: set[str] = set()

    def visit(node, stack):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for dep in sorted(graph.get(node, ())):
            found = visit(dep, stack + [node])
            if found:
                return found
        done.add(node)
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_find_cycle_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_package_imports_no_circle():
    """No import circle anywhere in edgetune (lazy imports inside functions included)."""
    graph = import_graph()
    assert "edgetune.eval.runner_args" in graph["edgetune.eval.drift"]  # relative imports are resolved
    assert "edgetune.export.gguf" in graph["edgetune.runfolder"]  # and so are lazy ones
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


# the layer table lives in edgetune.devdocs (ARCHITECTURE.md prints it): bottom first, by component
def layer_violations(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """``a -> b (lower layer -> higher layer)`` for every import that points up; unplaced components too."""
    rank = {c: i for i, (_, comps, *_) in enumerate(layers) for c in comps}
    name = {c: n for n, comps, *_ in layers for c in comps}

    def component(mod: str) -> str:
        return mod.split(".")[1] if "." in mod else ""

    bad = sorted({f"edgetune.{c} has no row in LAYERS" for m in graph if (c := component(m)) not in rank})
    for mod, deps in sorted(graph.items()):
        a = component(mod)
        bad += [f"{mod} -> {d} ({name[a]} imports {name[b]})" for d in sorted(deps)
                if a in rank and (b := component(d)) in rank and rank[b] > rank[a]]
    return bad


def test_layer_check_finds_an_upward_import():
    graph = {"edgetune.data.tools": {"edgetune.ollama.template"}, "edgetune.ollama.template": {"edgetune.data.tools"},
             "edgetune.newthing": set()}
    assert layer_violations(graph) == [
        "edgetune.newthing has no row in LAYERS",
        "edgetune.data.tools -> edgetune.ollama.template (model stages imports from a gguf)",
    ]


def test_lower_layers_import_nothing_from_higher_ones():
    """data, fuse and eval never import GGUF, quantization, Ollama or orchestration code; nothing imports the CLI."""
    bad = layer_violations(import_graph())
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("test_*.py")), ids=lambda p: p.name)
def test_test_modules_import_no_test_module(path):
    """Shared test helpers are conftest.py fixtures; test modules do not import each other or conftest."""
    local = {p.stem for p in (ROOT / "tests").glob("*.py")}
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] in local | {"tests"}]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in local | {"tests"}:
                bad.append(node.module)
    assert not bad, bad


def test_class_names_are_unique():
    """No two classes in edgetune share a name (two ``Example`` classes were easy to confuse)."""
    seen: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                seen.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
