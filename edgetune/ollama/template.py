"""The Ollama side of a chat template: the Go TEMPLATE for a model's Jinja chat template, and
a chat rendered both ways — the Jinja template as transformers renders it, the TEMPLATE as Ollama
renders it (our Go-template subset in :mod:`edgetune.gotemplate`, Ollama's message handling
here).

The Go TEMPLATE comes from the family table (:mod:`edgetune.chat_families`), with the details a
family leaves open (a built-in default system prompt, a dated preamble, the EOS and BOS text)
probed from the model's own Jinja template.
"""

from __future__ import annotations

import re

from .. import gotemplate
from ..chat_families import FAMILIES, Family, detect_family
from ..errors import EdgetuneError
from ..export.model_info import ModelInfo
from ..gotemplate.values import template_message, template_tools
from ..jinja import TemplateRejected, render_jinja


# ---------------------------------------------------------------- rendering a chat both ways
def ollama_messages(messages: list[dict], system: str | None) -> tuple[str, list[dict]]:
    """Messages as Ollama hands them to a template: SYSTEM prepended when the chat has none,
    then ``collate`` (consecutive same-role messages, tool results excepted, merged with a blank
    line). Source: ollama server/routes.go ChatHandler and template/template.go collate."""
    msgs = [dict(m) for m in messages]
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    sys_parts = [m["content"] for m in msgs if m["role"] == "system"]
    collated: list[dict] = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + (m.get("content") or "")
        else:  # what a template reads: Ollama's templateMessage (tool calls converted, see gomodel)
            collated.append(template_message(m))
    return "\n\n".join(sys_parts), collated


def render_ollama(template: str, messages: list[dict], system: str | None = None, tools: list[dict] | None = None,
                  think: bool | None = None) -> str:
    """Render a Modelfile TEMPLATE for a chat (and its tools) the way Ollama's /api/chat does.

    ``think``: the request's ``think`` field (None = not sent: ``.IsThinkSet`` false)."""
    sys_text, msgs = ollama_messages(messages, system)
    try:
        if gotemplate.uses_field(template, "Messages"):
            return gotemplate.render(template, {"System": sys_text, "Messages": msgs, "Tools": template_tools(tools),
                                                "Response": "", "Prompt": "", "Think": bool(think),
                                                "ThinkLevel": "", "IsThinkSet": think is not None})
        return _render_legacy(template, sys_text, msgs)
    except gotemplate.GoTemplateError as exc:
        raise EdgetuneError(f"The TEMPLATE cannot be rendered: {exc}", fix="fix the Go template") from None


def _render_legacy(template: str, system: str, msgs: list[dict]) -> str:
    """A .System/.Prompt/.Response template: executed once per user/assistant exchange, the last
    one cut after ``{{ .Response }}`` (Ollama template.go ``Execute``, legacy branch)."""
    tree = gotemplate.parse(template)
    out: list[str] = []
    prompt = response = ""

    def execute():
        nonlocal system, prompt, response
        out.append(gotemplate.render_tree(tree, {"System": system, "Prompt": prompt, "Response": response}))
        system = prompt = response = ""

    for m in msgs:
        if m["Role"] == "system":
            if prompt or response:
                execute()
            system = m["Content"]
        elif m["Role"] == "user":
            if response:
                execute()
            prompt = m["Content"]
        elif m["Role"] == "assistant":
            response = m["Content"]
    last = gotemplate.cut_after(tree, "Response")
    out.append(gotemplate.render_tree(last, {"System": system, "Prompt": prompt, "Response": response}))
    return "".join(out)


# ---------------------------------------------------------------- Jinja chat template -> Go TEMPLATE
def go_template_for(info: ModelInfo) -> tuple[Family, str]:
    """The Go TEMPLATE for the model's Jinja chat template (table lookup + probed details)."""
    jinja = info.chat_template
    if not jinja:
        raise EdgetuneError("The model has no chat template, so edgetune cannot write a matching TEMPLATE.",
                            where=info.source, fix="pass --template FILE with an Ollama Go template")
    fam = detect_family(jinja)
    if fam is None:
        raise EdgetuneError(
            "The model's chat template is not one of the families edgetune knows "
            f"({', '.join(f.name for f in FAMILIES)}).",
            where=info.source, fix="write the Ollama Go template yourself and pass --template FILE (it is then checked)",
        )
    go = fam.go.replace("@EOS@", _go_literal(info.eos_token or ""))
    default_block = ""
    if fam.default_system:
        try:  # a sentinel BOS tells template text from the bos_token variable
            probe = render_jinja(jinja, [{"role": "user", "content": "@U@"}], add_generation_prompt=True,
                                 bos_token="@BOS@", eos_token=info.eos_token)
        except TemplateRejected:
            probe = ""
        probe = probe.removeprefix("@BOS@")
        m = re.search(fam.default_system, probe, re.S)
        if m and m.group(1):
            default_block = fam.default_block.replace("@TEXT@", _go_literal(m.group(1)))
    go = go.replace("@DEFAULT@", default_block)
    if fam.probes:
        try:
            probe = render_jinja(jinja, [{"role": "user", "content": "@U@"}], add_generation_prompt=True,
                                 bos_token="@BOS@", eos_token=info.eos_token).removeprefix("@BOS@")
        except TemplateRejected:
            probe = ""
        for placeholder, rx in fam.probes:
            m = re.search(rx, probe, re.S)
            go = go.replace(placeholder, _go_literal(m.group(1)) if m else "")
    # BOS: llama.cpp adds it when the GGUF says add_bos_token; otherwise the template must carry it.
    if not info.add_bos and info.bos_token:
        try:
            first = render_jinja(jinja, [{"role": "user", "content": "x"}], add_generation_prompt=True,
                                 bos_token="@BOS@", eos_token=info.eos_token)
        except TemplateRejected:
            first = ""
        if first.startswith("@BOS@"):
            go = _go_literal(info.bos_token) + go
    return fam, go


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: as is, unless it contains the action delimiter."""
    return gotemplate.go_quote(text).join(("{{ ", " }}")) if "{{" in text else text
