"""Model runners behind one interface, chosen by a SPEC string ``[NAME=]KIND:TARGET``.

The runner table is every :class:`Runner` subclass in this package's modules (plus any a package
registers under the ``edgetune.runners`` entry-point group), keyed by its ``kind``; its class
attributes are the table's columns (``spec`` grammar, ``supports_logits``, ``local``). Adding a
runner is one module here. :func:`spec_grammar` prints the grammar::

    python -c "from edgetune.eval.runners import spec_grammar; print(spec_grammar())"

``NAME=`` labels the model in reports (``base=hf:models/base/x``); without it the name is derived
from the path. Backends (torch, llama.cpp, mlx) are imported only when their runner is made.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import EdgetuneError
from .base import Generation, GenParams, Runner, cut_at_stop

ENTRY_POINTS = "edgetune.runners"  # a plugin package's entry point: NAME = "module:RunnerClass"


@functools.cache
def runner_table() -> dict[str, type[Runner]]:
    """kind -> runner class: the subclasses of :class:`Runner` defined in this package, then plugins."""
    from importlib.metadata import entry_points

    found: dict[str, type[Runner]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Runner) and obj.__module__ == module.__name__ \
                    and obj.kind != Runner.kind:
                found[obj.kind] = obj
    for ep in entry_points(group=ENTRY_POINTS):
        cls = ep.load()
        found[cls.kind] = cls
    return found


def logit_kinds() -> tuple[str, ...]:
    """The runner kinds with next-token logits (NLL, drift, preference accuracy)."""
    return tuple(k for k, cls in runner_table().items() if cls.supports_logits)


def spec_grammar() -> str:
    return "\n".join(f"[NAME=]{cls.spec or cls.kind + ':TARGET'}" for cls in runner_table().values())


_NAME = re.compile(r"^([A-Za-z0-9_.+\-]+)=(.+)$")  # a name may hold "+" (q4_k_m+adapter)


@dataclass
class Spec:
    name: str
    kind: str
    target: str
    adapter: str | None
    raw: str


def parse_spec(spec: str) -> Spec:
    raw = spec.strip()
    name = None
    m = _NAME.match(raw)
    kinds = runner_table()
    if m and m.group(2).split(":", 1)[0] in kinds:
        name, raw = m.group(1), m.group(2)
    kind, sep, rest = raw.partition(":")
    if not sep or kind not in kinds:
        if raw.endswith(".gguf"):
            kind, rest = "gguf", raw
        elif Path(raw).is_dir():
            kind, rest = "hf", raw
        else:
            raise EdgetuneError(
                f"Model spec {spec!r} does not name a runner.",
                fix=f"write KIND:TARGET with KIND one of {', '.join(kinds)}, e.g. hf:models/base/x or gguf:out/m.gguf",
            )
    adapter = None
    if "+adapter:" in rest:
        rest, adapter = rest.split("+adapter:", 1)
    if not rest:
        raise EdgetuneError(f"Model spec {spec!r} has no target after '{kind}:'.")
    if name is None:
        name = _default_name(kind, rest, adapter)
    return Spec(name, kind, rest, adapter, spec)


def _default_name(kind: str, target: str, adapter: str | None) -> str:
    cls = runner_table()[kind]
    if cls.local:
        base = Path(target).name or target
        if base.endswith(".gguf"):
            base = base[: -len(".gguf")]
        if adapter:
            a = Path(adapter)
            base += "+" + (a.parent.name if a.name in ("adapter", "adapters") else a.stem)
        return cls.label_prefix + base
    return f"{kind}:{target.split('@')[0]}"


def make_runner(spec: str | Spec, **options) -> Runner:
    """Build the runner for ``spec``; ``options`` go to its constructor (e.g. ``n_ctx``)."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    runner_cls = runner_table()[s.kind]
    # Options are shared by all kinds (from EvalConfig); each runner takes the ones it knows.
    known = inspect.signature(runner_cls.__init__).parameters
    runner = runner_cls(s.target, adapter=s.adapter, **{k: v for k, v in options.items() if k in known})
    runner.spec = s.raw
    runner.name = s.name
    return runner


__all__ = ["logit_kinds", "runner_table", "spec_grammar", "Generation", "GenParams", "Runner", "Spec", "cut_at_stop", "make_runner", "parse_spec"]
