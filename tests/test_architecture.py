"""ARCHITECTURE.md against its generator, and the promises it makes: each table exists once (no
other module repeats its names), and a new piece takes the files it says."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from edgetune import devdocs
from edgetune.devdocs import EXTENSIONS, TABLES

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_md_is_the_generator_output():
    assert (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8") == devdocs.render(), \
        "regenerate it: python -m edgetune.devdocs"


def test_readme_points_at_architecture_md():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Contributing: where a new piece goes", 1)[1].split("\n## ", 1)[0]
    assert "ARCHITECTURE.md" in section
    assert len(section.strip().splitlines()) <= 8  # a pointer, not a second copy of the map


def _count(piece: str) -> int:
    e = next(e for e in EXTENSIONS if e.piece == piece)
    return len(e.files) + len(e.optional)


def test_file_counts_meet_the_targets():
    """issue 31: an architecture with its own tensor names <= 2 files, an eval runner 1, a stage <= 3."""
    assert _count("architecture") <= 2
    assert _count("eval runner") == 1
    assert _count("pipeline stage") <= 3
    assert _count("chat family") == _count("quant type") == _count("training objective") == 1


REGISTRIES = {  # file -> what a new piece adds to it (the extension table's claims, checked)
    "edgetune/arch.py": ["ARCHITECTURES"],
    "edgetune/export/gguf.py": ["HPARAMS_HOOKS"],
    "edgetune/chat_families.py": ["FAMILIES"],
    "edgetune/tool_syntax.py": ["SYNTAXES"],
    "edgetune/stages.py": ["STAGE_TABLE"],
    "edgetune/pipeline.py": ["_FUNCTIONS"],
    "edgetune/stageplan.py": ["STAGE_COSTS"],
    "edgetune/qtypes.py": ["QTYPES"],
    "edgetune/config.py": ["TrainConfig"],
}


@pytest.mark.parametrize("ext", EXTENSIONS, ids=lambda e: e.piece)
def test_each_extension_file_holds_its_registry(ext):
    for f in (*ext.files, *ext.optional):
        if "*" in f:
            assert (ROOT / f).parent.is_dir(), f
            continue
        tree = ast.parse((ROOT / f).read_text(encoding="utf-8"))
        defined = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                   for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        defined |= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
        assert set(REGISTRIES[f]) <= defined, (f, REGISTRIES[f])


def table_copies(table, package: Path = ROOT / "edgetune") -> list[str]:
    """``file:line`` of every literal tuple / list / set / dict outside the table's home whose strings
    are all names of the table, ``table.copy_at`` or more of them: a second copy of the table. A file
    in ``table.registries`` (the stage's functions, its cost, its config section) may key one dict by them."""
    names = set(table.names())
    home = ROOT / table.home
    found = []
    for path in sorted(package.rglob("*.py")):
        if path == home or home in path.parents or path.name == "devdocs.py":
            continue
        registry = str(path.relative_to(ROOT)) in table.registries if ROOT in path.parents else False
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None) \
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else None
            strings = {i.value for i in items or () if isinstance(i, ast.Constant) and isinstance(i.value, str)}
            if len(strings & names) >= table.copy_at and strings <= names and not (registry and isinstance(node, ast.Dict)):
                found.append(f"{path.relative_to(package)}:{node.lineno} {sorted(strings)}")
    return found


def test_copy_finder_finds_a_copy(tmp_path):
    stages = next(t for t in TABLES if t.title == "Stages")
    (tmp_path / "m.py").write_text('KEYS = ("train", "align", "export")\nOK = ("train", "valid", "test")\n'
                                   'HASHES = {"train": 1, "export": 2, "eval": 3}\nMIXED = {"cfg": 0, "train": 1, "export": 2, "eval": 3}\n')
    assert table_copies(stages, tmp_path) == ["m.py:1 ['align', 'export', 'train']", "m.py:3 ['eval', 'export', 'train']"]


@pytest.mark.parametrize("table", [t for t in TABLES if t.names()], ids=lambda t: t.title)
def test_no_module_keeps_a_copy_of_a_table(table):
    assert table.names(), table.title
    copies = table_copies(table)
    assert not copies, f"{table.title}: read {table.home} {table.symbol} instead of listing its names:\n" + "\n".join(copies)


# --- the eval runner: one file ---------------------------------------------------------------------


def test_a_runner_module_alone_adds_a_runner(tmp_path):
    """A Runner subclass in a module of the runners package is parsed, made and counted as a logit runner."""
    from edgetune.eval import runners

    (tmp_path / "echo_runner.py").write_text(textwrap.dedent('''
        from edgetune.eval.runners.base import Generation, Runner

        class EchoRunner(Runner):
            kind = "echo"
            spec = "echo:WORD"
            supports_logits = True
            local = True

            def __init__(self, target, adapter=None):
                super().__init__(f"echo:{target}")
                self.word = target

            def generate(self, messages, params):
                return Generation(text=self.word)
    '''))
    runners.__path__.append(str(tmp_path))
    runners.runner_table.cache_clear()
    try:
        assert "echo" in runners.runner_table()
        spec = runners.parse_spec("echo:hello")
        assert (spec.kind, spec.name) == ("echo", "hello")  # local: labelled by its target's name
        assert runners.make_runner(spec).word == "hello"
        assert "echo" in runners.logit_kinds()
        assert "[NAME=]echo:WORD" in runners.spec_grammar().splitlines()
    finally:
        runners.__path__.remove(str(tmp_path))
        runners.runner_table.cache_clear()
    assert "echo" not in runners.runner_table()


def test_runner_table_columns():
    from edgetune.eval.runners import logit_kinds, runner_table

    assert set(runner_table()) == {"hf", "mlx", "gguf", "ollama", "openai"}
    assert set(logit_kinds()) == {"hf", "mlx", "gguf"}
    assert all(c.spec.startswith(k + ":") for k, c in runner_table().items())
