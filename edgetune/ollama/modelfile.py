"""Writing an Ollama Modelfile whose TEMPLATE is the training template.

The TEMPLATE comes from the chat-template family table (:mod:`edgetune.chat_families`, filled in
by :mod:`edgetune.ollama.template`), stop tokens from the family and the model's end
tokens, SYSTEM from the caller or the training data, generation defaults and license from the
model. Every Modelfile is checked (:mod:`edgetune.ollama.check`) before it is written, and
written so that Ollama's parser reads back exactly what was meant
(:mod:`edgetune.ollama.modelfile_syntax`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import gotemplate
from ..chat_families import Family, detect_family
from ..errors import EdgetuneError
from ..export.model_info import ModelInfo, model_info
from ..io import write_text
from .check import CheckResult, compare
from .modelfile_syntax import format_modelfile, quote_value
from .template import go_template_for

if TYPE_CHECKING:
    from ..config import OllamaConfig


@dataclass
class ModelfileOptions:
    """What goes into a Modelfile besides its GGUF; every field is optional.

    ``None`` means "from the model": chat template, stop tokens, generation defaults and license
    come from ``model_dir`` (the HF folder) when given, else from the GGUF's metadata; ``system``
    from the dominant system prompt of ``train_data`` (a prepared JSONL split) when given.
    """

    model_dir: str | Path | None = None  # HF folder the model came from
    adapter_gguf: str | Path | None = None  # LoRA GGUF: FROM is then the base GGUF, an ADAPTER line follows
    from_name: str | None = None  # FROM this Ollama model name instead of the GGUF's path (the GGUF is still read)
    system: str | None = None  # SYSTEM prompt
    train_data: str | Path | None = None  # prepared JSONL whose dominant system prompt is the default SYSTEM
    template_file: str | Path | None = None  # a Go template to use instead of the family's (checked, not refused)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    num_ctx: int | None = None  # default: the model's context length capped at NUM_CTX_CAP
    check: bool = True  # compare TEMPLATE with the chat template before writing; refuse on a mismatch

    @classmethod
    def from_config(cls, cfg: OllamaConfig, **fields: Any) -> ModelfileOptions:
        """Options from a run config's ``ollama`` section, plus the paths it does not hold
        (``model_dir``, ``adapter_gguf``, ``train_data``)."""
        return cls(system=cfg.system, template_file=cfg.template, temperature=cfg.temperature, top_p=cfg.top_p,
                   top_k=cfg.top_k, repeat_penalty=cfg.repeat_penalty, num_ctx=cfg.num_ctx, check=cfg.check, **fields)


def _options(options: ModelfileOptions | None, fields: dict[str, Any]) -> ModelfileOptions:
    """``options`` with keyword ``fields`` applied (``write_modelfile(g, d, n, num_ctx=2048)``)."""
    return dataclasses.replace(options or ModelfileOptions(), **fields)


def stop_tokens(info: ModelInfo, fam: Family | None) -> list[str]:
    stops: list[str] = []
    for s in [*(fam.stops if fam else ()), info.eos_token, *info.extra_eos]:
        if s and s not in stops:
            stops.append(s)
    return stops


# Ollama allocates the KV cache for num_ctx up front: a 128k-context model would need tens of GB,
# so the default is the model's context length capped here (override with --num-ctx).
NUM_CTX_CAP = 8192


def _default_system_from_data(train_data) -> str | None:
    if not train_data:
        return None
    try:
        from ..data.stats import dominant_system_prompt  # lands with the data stage; optional here
    except ImportError:
        return None
    return dominant_system_prompt(train_data)


def _rel_or_abs(target: Path, base: Path) -> str:
    """FROM/ADAPTER path: relative (Ollama resolves it against the Modelfile's folder) when the file
    is inside the Modelfile's folder or a sibling folder of it (run/gguf next to run/ollama), so a
    moved run folder keeps working; absolute otherwise."""
    target, base = target.resolve(), base.resolve()
    for prefix, root in (("./", base), ("../", base.parent)):
        try:
            return prefix + target.relative_to(root).as_posix()
        except ValueError:
            continue
    return target.as_posix()


def build_modelfile(gguf_path, out_dir, name: str, options: ModelfileOptions | None = None,
                    **fields: Any) -> tuple[str, CheckResult | None]:
    """Modelfile text and its check result (see :func:`write_modelfile`)."""
    o = _options(options, fields)
    adapter_gguf, template_file, system = o.adapter_gguf, o.template_file, o.system
    gguf = Path(gguf_path)
    if not gguf.exists():
        raise EdgetuneError(f"GGUF file not found: {gguf}", where=str(gguf), exit_code=2)
    if adapter_gguf and not Path(adapter_gguf).exists():
        raise EdgetuneError(f"Adapter GGUF not found: {adapter_gguf}", where=str(adapter_gguf), exit_code=2)
    out = Path(out_dir)
    info = model_info(gguf, o.model_dir)
    fam = detect_family(info.chat_template) if info.chat_template else None
    if template_file:
        tpath = Path(template_file)
        if not tpath.exists():
            raise EdgetuneError(f"Template file not found: {tpath}", where=str(tpath), exit_code=2)
        go = tpath.read_text(encoding="utf-8")
        try:
            gotemplate.parse(go)
        except gotemplate.GoTemplateError as exc:
            raise EdgetuneError(f"The template file is not a valid Go template: {exc}", where=str(tpath)) from None
        family_name = "custom"
    else:
        fam, go = go_template_for(info)
        family_name = fam.name
    if system is None:
        system = _default_system_from_data(o.train_data)
    result = None
    if o.check and info.chat_template:
        result = compare(go, info, system, family=family_name)
        if not result.ok and not template_file:
            raise EdgetuneError(
                f"The '{family_name}' Go template does not reproduce this model's chat template:\n{result.diff}",
                where=info.source, fix="pass --template FILE with a Go template that matches (it is then checked)",
            )
    commands: list[tuple[str, str]] = [("FROM", o.from_name or _rel_or_abs(gguf, out))]
    if adapter_gguf:
        commands.append(("ADAPTER", _rel_or_abs(Path(adapter_gguf), out)))
    commands.append(("TEMPLATE", go))
    if system:
        commands.append(("SYSTEM", system))
    for s in stop_tokens(info, fam):
        commands.append(("PARAMETER", f"stop {s}"))
    gen = info.generation
    params = {
        "temperature": o.temperature if o.temperature is not None else gen.get("temperature"),
        "top_p": o.top_p if o.top_p is not None else gen.get("top_p"),
        "top_k": o.top_k if o.top_k is not None else gen.get("top_k"),
        "repeat_penalty": o.repeat_penalty if o.repeat_penalty is not None else gen.get("repetition_penalty"),
        "num_ctx": o.num_ctx if o.num_ctx is not None else (min(int(info.context_length), NUM_CTX_CAP) if info.context_length else None),
    }
    for k, v in params.items():
        if v is not None:
            commands.append(("PARAMETER", f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"))
    if info.license:
        try:
            quote_value(info.license, "LICENSE")
            commands.append(("LICENSE", info.license))
        except EdgetuneError:
            pass  # a license text Ollama could not read back verbatim is left out rather than altered
    header = (f"Modelfile for {name}, written by edgetune.\n"
              f"TEMPLATE family: {family_name}"
              + (f"; checked against the chat template: {result.n_identical} conversations identical"
                 f" ({result.conversations[0].compared if result.conversations else 'text'})" if result else "")
              + f"\nTools: {_tools_line(fam if not template_file else None, go)}"
              + (f"\nThinking: {_thinking_line(result)}" if result and _thinking_line(result) else "")
              + f"\nCreate it with: ollama create {name} -f Modelfile")
    return format_modelfile(commands, header), result


def _thinking_line(result) -> str:
    """What the header says about reasoning (Ollama offers thinking when the TEMPLATE uses .Thinking)."""
    think = [c for c in result.conversations if c.name.startswith("thinking")]
    if not think:
        return ""
    same = sum(c.status == "identical" for c in think)
    return (f"the template's <think> block; think on/off, earlier turns' reasoning and reasoning before tool calls "
            f"checked ({same}/{len(think)} conversations identical); Ollama returns it as message.thinking")


def _tools_line(fam: Family | None, go: str) -> str:
    """What the header says about tool calling (Ollama offers tools only when the TEMPLATE uses .Tools)."""
    if fam is not None and fam.tools:
        return (f"rendered ({fam.tools} call syntax, {'parallel calls allowed' if fam.parallel_calls else 'one call per turn'}; "
                "checked with tool conversations)")
    if gotemplate.uses_field(go, "Tools"):
        return "rendered by the custom TEMPLATE"
    return (f"NOT rendered: the {fam.name if fam else 'custom'} TEMPLATE has no tool-call syntax, "
            "so Ollama reports that this model does not support tools")


def write_modelfile(gguf_path, out_dir, name: str, options: ModelfileOptions | None = None, **fields: Any) -> Path:
    """Write ``out_dir/Modelfile`` for ``gguf_path`` (atomically) and return its path.

    ``FROM`` is ``gguf_path`` (relative when it lies under ``out_dir`` or a sibling folder); with
    ``adapter_gguf`` it is the base GGUF and an ``ADAPTER`` line follows. ``options`` (or the same
    fields as keywords, which win) say the rest: see :class:`ModelfileOptions`. The TEMPLATE is
    checked against the chat template before anything is written and a mismatch raises
    (``check=False`` skips it; a ``template_file`` is checked but not refused).
    """
    text, _ = build_modelfile(gguf_path, out_dir, name, _options(options, fields))
    return write_text(Path(out_dir) / "Modelfile", text)
