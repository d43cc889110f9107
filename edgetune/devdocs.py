"""ARCHITECTURE.md, generated: the layers, the one-row-per-concept tables and where a new piece goes.

``python -m edgetune.devdocs`` rewrites ARCHITECTURE.md from the tables themselves (``--check``
exits 1 when the file is stale); tests/test_architecture.py checks the file matches, that each
extension point's file count holds, and that no other module keeps a copy of a table's names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Layers, bottom first, by component (``edgetune.<component>``; "" is the package itself). A module
# imports from its own layer or lower ones only (tests/test_structure.py); a new component needs a row.
LAYERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("go templates", ("gotemplate",), "Go's text/template subset Ollama templates use; imports nothing of edgetune's"),
    ("foundation", ("", "errors", "io", "console", "paths", "hardware", "precision", "arch", "chat_families",
                    "tool_syntax", "qtypes", "stages", "tensors", "llamacpp", "jinja", "model_dir", "ollama_client"),
     "the tables (architectures, chat families, tool syntaxes, quant types, stages) and helpers every layer reads"),
    # one layer because config validates against train's objective table, data's replay generates
    # with an eval runner and train's rewards score with eval's metrics
    ("model stages", ("config", "recipes", "reasoning", "toolcalls", "data", "train", "fuse", "streaming", "eval"),
     "the typed config and the stages that work on HF models: data, training, fuse, eval"),
    ("gguf", ("export",), "HF -> GGUF conversion, vocabulary, adapter and importance-matrix GGUFs, verification"),
    ("from a gguf", ("quant", "ollama"), "quantization (`edgetune export`), Ollama Modelfile, TEMPLATE and check"),
    ("orchestration", ("stageplan", "pipeline", "runfolder", "registry", "aliases", "publish", "align", "model_import",
                       "demo_model", "doctor", "devdocs"), "`edgetune run`, the run folder, the registry, plans"),
    ("interfaces", ("serve", "cli", "__main__"), "the command line and the OpenAI-compatible server"),
)


@dataclass(frozen=True)
class Table:
    """One concept's table: where it lives, what reads it, the names a copy would repeat."""

    title: str
    home: str  # module path, relative to the repository root
    symbol: str
    derives: str  # what reads it
    rows: Callable[[], tuple[list[str], list[list[str]]]]  # (header, rows) as ARCHITECTURE.md shows them
    copy_at: int = 3  # this many of its names in one literal outside ``home`` make a copy (0: not checked)
    # other files allowed one literal keyed by the names: the extension's own registries
    registries: tuple[str, ...] = ()

    def names(self) -> list[str]:
        """The rows' names (first column): a literal listing several of them elsewhere is a copy."""
        return [r[0].split(",")[0] for r in self.rows()[1]] if self.copy_at else []


@dataclass(frozen=True)
class Extension:
    """Where a contributor adds a piece: the files it takes (their count is the promise)."""

    piece: str
    files: tuple[str, ...]  # every file a new one touches; ``*`` in a name: a new file
    registered: str
    optional: tuple[str, ...] = ()  # files touched only in some cases (counted)


def _stages():
    from .stages import STAGE_TABLE

    return (["stage", "does", "writes", "reads", "runs"],
            [[s.name, s.does, f"RUN/{s.folder}/" if s.folder else "-", ", ".join(s.reads) or "-", s.when or "always"]
             for s in STAGE_TABLE])


def _qtypes():
    from .qtypes import QTYPES

    def yes(b: bool) -> str:
        return "yes" if b else ""

    return (["type", "bits", "converter writes", "quantize", "`--quant auto` ladder", "imatrix", "verify gate"],
            [[q.name, f"{q.bits:g}", yes(q.convert), yes(q.quantize), yes(q.ladder),
              "needed" if q.needs_imatrix else yes(q.imatrix), f"{q.verify_tolerance:g} σ" if q.verify_tolerance else ""]
             for q in QTYPES.values()])


def _runners():
    from .eval.runners import runner_table

    return (["kind", "class", "logits", "spec"],
            [[k, f"{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}", "yes" if c.supports_logits else "", f"`{c.spec}`"]
             for k, c in runner_table().items()])


def _syntaxes():
    from .chat_families import FAMILIES
    from .tool_syntax import SYNTAXES

    return (["syntax", "families pointing at it", "call opens with"],
            [[s.name, ", ".join(f.name for f in FAMILIES if f.tools == s.name),
              ", ".join(f"`{o}`" for o in (*s.openers, *s.leading))] for s in SYNTAXES])


def _families():
    from .chat_families import FAMILIES

    return (["family", "`--chat-template NAME`", "tool syntax"],
            [[f.name, "yes" if f.jinja else "", f.tools] for f in FAMILIES])


def _architectures():
    from .arch import ARCHITECTURES

    return (["HF model_type", "llama.cpp arch", "hparams hook", "own tensor names"],
            [[a.model_type + "".join(f", {x}" for x in a.aliases), a.gguf_arch, a.hparams, str(len(a.tensor_names) or "")]
             for a in ARCHITECTURES.values()])


def _objectives():
    from .train.objectives import OBJECTIVES

    return (["objective", "what it optimises", "settings"],
            [[n, o.summary, ", ".join(p.name for p in o.params)] for n, o in OBJECTIVES.items()])


def _train_flags():
    from dataclasses import fields

    from .config import TrainConfig

    fs = [f for f in fields(TrainConfig) if "help" in f.metadata]
    return (["setting", "flag"], [[f.name, f.metadata["flag"] or "--" + f.name.replace("_", "-")] for f in fs])


TABLES: tuple[Table, ...] = (
    Table("Stages", "edgetune/stages.py", "STAGE_TABLE",
          "pipeline.PIPELINE (each row's functions), runfolder.RunFolder (stage folders, `aligned`), "
          "stageplan.STAGE_COSTS (its order), `edgetune run --from/--to` and its help, `edgetune plan`", _stages,
          registries=("edgetune/pipeline.py", "edgetune/stageplan.py", "edgetune/config.py")),
    Table("Quant types", "edgetune/qtypes.py", "QTYPES",
          "config choices (export.outtype, export.quants), export/gguf.py (tensor types), export/verify.py "
          "(tolerances), export/adapter.py (adapter types), quant/ (quantize, auto ladder, imatrix), "
          "stageplan and `edgetune plan` (disk), `edgetune export` help", _qtypes),
    Table("Eval runners", "edgetune/eval/runners/", "runner_table()",
          "SPEC parsing and labels, make_runner, drift and NLL (the runners with logits), `edgetune eval` help", _runners),
    Table("Tool-call syntaxes", "edgetune/tool_syntax.py", "SYNTAXES",
          "chat families (`Family.tools` names a row), eval and reward call parsing, serve's chat handler "
          "(prefill and closer of a forced call)", _syntaxes, copy_at=2),
    Table("Chat families", "edgetune/chat_families.py", "FAMILIES",
          "`--chat-template NAME`, the Ollama TEMPLATE and its check, tool-data warnings", _families),
    Table("Architectures", "edgetune/arch.py", "ARCHITECTURES",
          "HF -> GGUF tensor names (converter, adapter export, imatrix), LoRA targets, the memory estimate, "
          "the README architecture table", _architectures),
    Table("Training objectives", "edgetune/train/objectives/", "OBJECTIVES",
          "train.objective choices, TrainConfig fields and flags (their `Param`s), the support table", _objectives),
    Table("Train flags", "edgetune/config.py", "TrainConfig (fields made with `flag`)",
          "every `edgetune train` option, its help text and the default it shows", _train_flags, copy_at=0),
)

EXTENSIONS: tuple[Extension, ...] = (
    Extension("architecture", ("edgetune/arch.py",), "a row of `ARCHITECTURES` (tensor names included)",
              optional=("edgetune/export/gguf.py",)),
    Extension("chat family", ("edgetune/chat_families.py",), "a row of `FAMILIES` (its `tools` names a syntax row)"),
    Extension("tool-call syntax", ("edgetune/tool_syntax.py",), "a row of `SYNTAXES`"),
    Extension("training objective", ("edgetune/train/objectives/*.py",), "a module defining `OBJECTIVE`"),
    Extension("eval runner", ("edgetune/eval/runners/*.py",),
              "a `Runner` subclass with its `kind` (or the `edgetune.runners` entry point of another package)"),
    Extension("pipeline stage", ("edgetune/stages.py", "edgetune/pipeline.py", "edgetune/stageplan.py"),
              "a row of `STAGE_TABLE`, its functions in `_FUNCTIONS`, its cost in `STAGE_COSTS`"),
    Extension("quant type", ("edgetune/qtypes.py",), "a row of `QTYPES`"),
    Extension("train setting", ("edgetune/config.py",), "a `TrainConfig` field made with `flag(default, help)`"),
)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows)])


def render() -> str:
    out = [
        "# Architecture",
        "",
        "<!-- generated by `python -m edgetune.devdocs` from the tables below; tests/test_architecture.py checks it -->",
        "",
        "edgetune is a pipeline of stages over one run folder, each stage a thin call to the library function its",
        "own command uses. Every concept that comes in kinds (stages, quant types, runners, chat families, tool",
        "syntaxes, architectures, objectives, train flags) is one table; everything else reads the table.",
        "",
        "## Layers",
        "",
        "A module imports from its own layer or lower ones, never higher, and nothing imports in a circle",
        "(tests/test_structure.py, lazy imports included). Bottom first:",
        "",
        _md_table(["layer", "components (`edgetune.<name>`)", "what"],
                  [[n, ", ".join(f"`{c}`" if c else "(package)" for c in comps), about] for n, comps, about in LAYERS]),
        "",
        "## Tables",
        "",
    ]
    for t in TABLES:
        header, rows = t.rows()
        out += [f"### {t.title}: `{t.home}` {t.symbol}", "", f"Read by: {t.derives}.", ""]
        if t.title == "Train flags":
            out += [f"{len(rows)} `edgetune train` options are generated from these fields "
                    "(`edgetune.cli.train.train_config_options`).", ""]
            continue
        out += [_md_table(header, rows), ""]
    out += [
        "## Where a new piece goes",
        "",
        "`*` is the new file. The counts are kept true by tests/test_architecture.py: each table's home holds",
        "its registry, and no other module repeats a table's names.",
        "",
        _md_table(["a new ...", "files", "where", "what"],
                  [[e.piece, _count(e), ", ".join(f"`{f}`" for f in (*e.files, *e.optional)), e.registered
                    + (f" (`{'`, `'.join(e.optional)}` only where the format needs code)" if e.optional else "")]
                   for e in EXTENSIONS]),
        "",
        "Its tests come on top: the table tests run over every row.",
        "",
    ]
    return "\n".join(out)


def _count(e: Extension) -> str:
    n = len(e.files)
    return f"{n}–{n + len(e.optional)}" if e.optional else str(n)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = ROOT / "ARCHITECTURE.md"
    text = render()
    if "--check" in argv:
        ok = path.is_file() and path.read_text(encoding="utf-8") == text
        print("ARCHITECTURE.md is up to date" if ok else "ARCHITECTURE.md is stale: run python -m edgetune.devdocs")
        return 0 if ok else 1
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
