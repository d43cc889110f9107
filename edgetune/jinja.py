"""A Jinja chat template rendered the way transformers renders it (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII).

Without a tokenizer: the reasoning probe, the Ollama check and the tests render a template string
directly. A bottom-layer module (jinja2 is imported when a template is rendered).
"""

from __future__ import annotations

import json
import time

from .errors import EdgetuneError


class TemplateRejected(Exception):
    """The Jinja chat template raised (e.g. 'System role not supported')."""


def render_jinja(template: str, messages: list[dict], *, add_generation_prompt: bool, bos_token: str | None,
                 eos_token: str | None, tools: list[dict] | None = None, **extra) -> str:
    """Render a chat template the way transformers does (sandboxed, trim_blocks, lstrip_blocks);
    ``extra``: template kwargs such as ``enable_thinking``."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateRejected(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools or None, documents=None,
            bos_token=bos_token or "", eos_token=eos_token or "", **extra,
        )
    except TemplateError as exc:
        raise EdgetuneError(f"The chat template does not render: {exc}", fix="fix the chat template") from None
