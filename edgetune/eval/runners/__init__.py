"""Model runners behind one interface, chosen by a SPEC string.

SPEC grammar (one row per runner kind in :data:`KINDS`; first matching prefix wins)::

    [NAME=]hf:MODEL_DIR[+adapter:PEFT_ADAPTER_DIR]
    [NAME=]mlx:MODEL_DIR[+adapter:MLX_ADAPTER_DIR]
    [NAME=]gguf:FILE.gguf[+adapter:LORA.gguf]
    [NAME=]ollama:MODEL_NAME                 (server at $OLLAMA_HOST, default 127.0.0.1:11434)
    [NAME=]openai:MODEL@BASE_URL | openai:BASE_URL | openai:MODEL   (base URL from $OPENAI_BASE_URL)

``NAME=`` labels the model in reports (``base=hf:models/base/x``); without it the name is derived
from the path. Backends are imported only when their runner is made.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import EdgetuneError
from .base import Generation, GenParams, Runner, cut_at_stop

# kind -> (module, class). Source of the kinds: the runtimes edgetune exports to.
KINDS: dict[str, tuple[str, str]] = {
    "hf": ("edgetune.eval.runners.hf", "HFRunner"),
    "mlx": ("edgetune.eval.runners.mlx", "MLXRunner"),
    "gguf": ("edgetune.eval.runners.gguf", "GGUFRunner"),
    "ollama": ("edgetune.eval.runners.http", "OllamaRunner"),
    "openai": ("edgetune.eval.runners.http", "OpenAIRunner"),
}

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
    if m and m.group(2).split(":", 1)[0] in KINDS:
        name, raw = m.group(1), m.group(2)
    kind, sep, rest = raw.partition(":")
    if not sep or kind not in KINDS:
        if raw.endswith(".gguf"):
            kind, rest = "gguf", raw
        elif Path(raw).is_dir():
            kind, rest = "hf", raw
        else:
            raise EdgetuneError(
                f"Model spec {spec!r} does not name a runner.",
                fix=f"write KIND:TARGET with KIND one of {', '.join(KINDS)}, e.g. hf:models/base/x or gguf:out/m.gguf",
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
    if kind in ("hf", "mlx", "gguf"):
        base = Path(target).name or target
        if base.endswith(".gguf"):
            base = base[: -len(".gguf")]
        if adapter:
            a = Path(adapter)
            base += "+" + (a.parent.name if a.name in ("adapter", "adapters") else a.stem)
        return base if kind != "mlx" else f"mlx:{base}"
    return f"{kind}:{target.split('@')[0]}"


def make_runner(spec: str | Spec, **options) -> Runner:
    """Build the runner for ``spec``; ``options`` go to its constructor (e.g. ``n_ctx``)."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    module, cls = KINDS[s.kind]
    runner_cls = getattr(importlib.import_module(module), cls)
    # Options are shared by all kinds (from EvalConfig); each runner takes the ones it knows.
    known = inspect.signature(runner_cls.__init__).parameters
    runner = runner_cls(s.target, adapter=s.adapter, **{k: v for k, v in options.items() if k in known})
    runner.spec = s.raw
    runner.name = s.name
    return runner


__all__ = ["KINDS", "Generation", "GenParams", "Runner", "Spec", "cut_at_stop", "make_runner", "parse_spec"]
