"""The check that proves a Modelfile's TEMPLATE is the training chat template.

Most "my fine-tuned model rambles forever in Ollama" reports come from a Modelfile whose TEMPLATE
or stop tokens differ from the chat template the model was trained with. Here a set of
conversations (single and multi-turn, with and without a system prompt, ending on a user or an
assistant turn) is rendered with the Jinja chat template and with the TEMPLATE the way Ollama
renders it, and the two are compared — as token ids when the tokenizer is at hand, as text
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import gotemplate
from ..chat_families import FAMILY_BY_NAME, detect_family
from ..errors import EdgetuneError
from ..export.model_info import ModelInfo, cached_tokenizer, model_info
from ..jinja import render_jinja
from .modelfile_syntax import read_modelfile
from .template import render_ollama

# Conversations the check renders: single and multi-turn, with and without a system prompt,
# ending on a user turn (generation prompt) or on an assistant turn (a training example).
_U1, _A1, _U2, _A2, _U3 = (
    "What is the capital of France?",
    "The capital of France is Paris.",
    "And of Italy? Answer in one word.",
    "Rome.",
    "Thanks! Now write a haiku about the sea — in français, s'il vous plaît. 🌊",
)
_SYS = "You are a concise assistant.\nAnswer in plain text."
CONVERSATIONS: list[tuple[str, list[dict]]] = [
    ("single turn", [{"role": "user", "content": _U1}]),
    ("single turn + system", [{"role": "system", "content": _SYS}, {"role": "user", "content": _U1}]),
    ("two turns", [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}]),
    ("two turns + system", [{"role": "system", "content": _SYS}, {"role": "user", "content": _U1},
                            {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}]),
    ("three turns, unicode", [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                              {"role": "user", "content": _U2}, {"role": "assistant", "content": _A2},
                              {"role": "user", "content": _U3}]),
    ("training example", [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}]),
    ("training example + system", [{"role": "system", "content": _SYS}, {"role": "user", "content": _U1},
                                   {"role": "assistant", "content": _A1}]),
    ("multi-turn training example", [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                                     {"role": "user", "content": _U2}, {"role": "assistant", "content": _A2}]),
]


# Tool conversations (checked for families with tool syntax): tools declared, a call, a result and
# a final answer; several tools; parallel calls where the family allows them. The schemas and
# arguments hold what Go prints differently from Python unless handled (<, &, quotes, newlines,
# non-ASCII, enums, nested objects, arrays, floats, null) and go through the data stage's
# canonicalisation, as training data does.
_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": 'Current weather for a city <"quoted"> & more.\nSecond line: température ☀',
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
            "city": {"type": "string", "description": "City name, e.g. \"Paris\""},
            "when": {"type": "object", "description": "Optional time", "required": ["day"], "properties": {
                "day": {"type": "string", "enum": ["today", "tomorrow"]}, "hour": {"type": ["integer", "null"]}}},
            "fields": {"type": "array", "items": {"type": "string", "enum": ["temp", "wind"]}}}}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value between units.",
        "parameters": {"type": "object", "required": ["value", "from", "to"], "properties": {
            "value": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "list_cities", "description": "", "parameters": {"type": "object", "properties": {}}}},
]
_ARGS1 = {"city": "Paris <&> \"Île-de-France\"\nFR", "unit": "celsius", "when": {"hour": None, "day": "today"},
          "fields": ["temp", "wind"]}
_ARGS2 = {"value": 2.5, "from": "km", "to": "mi"}


def _call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def _tool_conversations(parallel: bool) -> list[tuple[str, list[dict], list[dict]]]:
    from ..data.formats import normalise

    u1 = {"role": "user", "content": "What's the weather in Paris? Also 2.5 km in miles."}
    c1 = {"role": "assistant", "content": "", "tool_calls": [_call("call00001", "get_weather", _ARGS1)]}
    r1 = {"role": "tool", "content": '{"temp": 18, "sky": "clear <&>"}', "tool_call_id": "call00001"}
    a1 = {"role": "assistant", "content": "It is 18 °C and clear in Paris."}
    c2 = {"role": "assistant", "content": "", "tool_calls": [_call("call00002", "convert_units", _ARGS2)]}
    r2 = {"role": "tool", "content": "1.55", "tool_call_id": "call00002"}
    a2 = {"role": "assistant", "content": "2.5 km is about 1.55 miles."}
    u2 = {"role": "user", "content": "Thanks. Which cities do you know?"}
    c3 = {"role": "assistant", "content": "", "tool_calls": [_call("call00003", "list_cities", {})]}
    sys_ = {"role": "system", "content": "You are a weather assistant. Use the tools."}
    convs = [
        ("tools: request", [u1]),
        ("tools: call (training example)", [u1, c1]),
        ("tools: result, generation prompt", [u1, c1, r1]),
        ("tools: call, result, answer", [u1, c1, r1, a1]),
        ("tools: system, call, result, answer", [sys_, u1, c1, r1, a1]),
        ("tools: two rounds, several tools", [u1, c1, r1, a1, u2, c3, {**r1, "tool_call_id": "call00003", "content": "[]"},
                                              {"role": "assistant", "content": "None yet."}]),
    ]
    if parallel:
        both = {"role": "assistant", "content": "", "tool_calls": c1["tool_calls"] + c2["tool_calls"]}
        convs.append(("tools: parallel calls, results, answer", [u1, both, r1, r2, a2]))
    out = []
    for name, msgs in convs:
        rec = normalise({"messages": msgs + ([] if msgs[-1]["role"] == "assistant" else [a1]), "tools": _TOOLS})
        canon = rec.messages if msgs[-1]["role"] == "assistant" else rec.messages[:-1]
        out.append((name, canon, rec.tools))
    return out


# Thinking conversations (checked when the chat template renders reasoning or has a thinking switch):
# the request's think setting on and off (Ollama's think field, the template's enable_thinking),
# reasoning on the final answer, earlier turns' reasoning (dropped or kept as the template does) and
# reasoning before a tool call. The fourth element is the request's think setting (None = not sent).
_R1, _R2 = "The user asks for a capital. France's capital is Paris.", "Italy's capital is Rome; one word."


def _thinking_conversations(with_tools: bool) -> list[tuple[str, list[dict], list[dict] | None, bool | None]]:
    u1, u2 = {"role": "user", "content": _U1}, {"role": "user", "content": _U2}
    a1 = {"role": "assistant", "content": _A1, "reasoning_content": _R1}
    a2 = {"role": "assistant", "content": _A2, "reasoning_content": _R2}
    convs: list[tuple] = [
        ("thinking on: request", [u1], None, True),
        ("thinking off: request", [u1], None, False),
        ("thinking off: request + system", [{"role": "system", "content": _SYS}, u1], None, False),
        ("thinking: training example with reasoning", [u1, a1], None, None),
        ("thinking on: two turns, earlier reasoning", [u1, a1, u2], None, True),
        ("thinking off: two turns, earlier reasoning", [u1, a1, u2], None, False),
        ("thinking: multi-turn training example with reasoning", [u1, a1, u2, a2], None, None),
    ]
    if with_tools:
        for name, msgs, tools in _tool_conversations(False):
            if name in ("tools: result, generation prompt", "tools: call, result, answer"):
                msgs = [dict(m) for m in msgs]
                for m in msgs:
                    if m["role"] == "assistant":
                        m["reasoning_content"] = "I need the weather tool." if m.get("tool_calls") else "The tool says 18 and clear."
                convs.append((f"thinking on: {name} with reasoning", msgs, tools, True))
    return convs


@dataclass
class ConversationCheck:
    name: str
    status: str  # "identical" | "different" | "skipped"
    n_tokens: int = 0
    compared: str = "text"  # "tokens" or "text"
    diff: str = ""
    reason: str = ""


@dataclass
class CheckResult:
    ok: bool
    family: str | None
    conversations: list[ConversationCheck]
    notes: list[str] = field(default_factory=list)

    @property
    def n_identical(self) -> int:
        return sum(c.status == "identical" for c in self.conversations)

    @property
    def diff(self) -> str:
        return "\n\n".join(f"[{c.name}]\n{c.diff}" for c in self.conversations if c.status == "different")

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "family": self.family, "identical": self.n_identical, "notes": self.notes,
            "conversations": [c.__dict__ for c in self.conversations],
        }


def _text_diff(want: str, got: str, width: int = 40) -> str:
    i = next((k for k in range(min(len(want), len(got))) if want[k] != got[k]), min(len(want), len(got)))
    lo = max(0, i - width)
    return (f"texts part at character {i}:\n"
            f"  chat template: …{want[lo:i + width]!r}\n"
            f"  Modelfile:     …{got[lo:i + width]!r}")


def _token_diff(tok, want: list[int], got: list[int], width: int = 6) -> str:
    i = next((k for k in range(min(len(want), len(got))) if want[k] != got[k]), min(len(want), len(got)))
    lo = max(0, i - width)

    def show(ids):
        return " ".join(f"{t}:{tok.convert_ids_to_tokens(t)!r}" for t in ids[lo:i + width])

    return (f"token ids part at position {i} (chat template {len(want)} tokens, Modelfile {len(got)}):\n"
            f"  chat template: {show(want)}\n"
            f"  Modelfile:     {show(got)}")


def compare(go_template: str, info: ModelInfo, system: str | None = None, *, family: str | None = None,
            conversations: list[tuple] | None = None, use_tokenizer: bool = True, with_tools: bool = True) -> CheckResult:
    """Render every conversation with the Jinja chat template and with the Go TEMPLATE; compare.

    The Ollama side is ``[BOS if the GGUF adds one] + tokens(TEMPLATE rendering)``, exactly what
    llama.cpp feeds the model; the reference is the chat template's rendering tokenized as
    ``apply_chat_template(tokenize=True)`` does. ``conversations``: (name, messages[, tools[, think]])
    tuples; by default the built-in ones plus thinking conversations (think on/off, reasoning kept or
    dropped, with tool calls) for a template that renders reasoning, and, ``with_tools``, tool
    conversations for a family with tool syntax (a family without it gets a note saying tools are not rendered).
    """
    if not info.chat_template:
        raise EdgetuneError("The model has no chat template to compare the TEMPLATE with.", where=info.source,
                            fix="pass --model-dir with the HF folder the model was trained from")
    tok = cached_tokenizer(info.tokenizer_dir) if (use_tokenizer and info.tokenizer_dir) else None
    bos = info.bos_token or ""
    results: list[ConversationCheck] = []
    notes: list[str] = []
    fam = FAMILY_BY_NAME.get(family or "")
    convs = [(c[0], c[1], c[2] if len(c) > 2 else None, c[3] if len(c) > 3 else None) for c in (conversations or CONVERSATIONS)]
    if conversations is None:
        from ..reasoning import probe_jinja

        thinking = probe_jinja(info.chat_template, info.bos_token or "", info.eos_token or "")
        if thinking.any:
            convs += _thinking_conversations(with_tools and (fam is not None and bool(fam.tools)))
            if not gotemplate.uses_field(go_template, "Thinking"):
                notes.append("the chat template renders reasoning but this TEMPLATE has no .Thinking: "
                             "Ollama will say the model does not support thinking")
    if conversations is None and with_tools:
        if fam is not None and fam.tools:
            convs += [(*c, None) for c in _tool_conversations(fam.parallel_calls)]
            if not fam.parallel_calls:
                notes.append(f"family {fam.name} allows one tool call per turn: parallel calls are not checked")
        elif gotemplate.uses_field(go_template, "Tools"):
            convs += [(*c, None) for c in _tool_conversations(True)]
        else:
            renders_tools = "tools" in info.chat_template
            notes.append(f"tools are not rendered: {'the ' + fam.name + ' family' if fam else 'this TEMPLATE'} has no tool-call "
                         "syntax, so Ollama will say this model does not support tools"
                         + (" (the chat template does render tools: they are lost in Ollama)" if renders_tools else ""))
    if system:  # also what Ollama sends when the Modelfile's SYSTEM is injected
        convs += [(f"{n} (Modelfile SYSTEM)", c, t, k) for n, c, t, k in convs if c[0]["role"] != "system"]
    legacy = not gotemplate.uses_field(go_template, "Messages")
    for name, conv, tools, think in convs:
        think_kw = {} if think is None else {"enable_thinking": think}
        injected = system if name.endswith("(Modelfile SYSTEM)") else None
        if legacy and conv[-1]["role"] == "assistant":
            results.append(ConversationCheck(name, "skipped", reason="a legacy .Prompt/.Response template leaves "
                                             "the last assistant turn open (Ollama continues it)"))
            continue
        ref_msgs = ([{"role": "system", "content": injected}] if injected else []) + conv
        agp = conv[-1]["role"] != "assistant"
        try:
            if tok is not None and tok.chat_template:
                want_text = tok.apply_chat_template(ref_msgs, tokenize=False, add_generation_prompt=agp,
                                                    **({"tools": tools} if tools else {}), **think_kw)
            else:
                want_text = render_jinja(info.chat_template, ref_msgs, add_generation_prompt=agp,
                                         bos_token=info.bos_token, eos_token=info.eos_token, tools=tools, **think_kw)
        except Exception as exc:  # noqa: BLE001 - jinja raise_exception surfaces as various types
            if isinstance(exc, EdgetuneError):
                raise
            results.append(ConversationCheck(name, "skipped", reason=f"the chat template rejects it: {exc}"))
            continue
        got_text = render_ollama(go_template, conv, injected, tools, think=think)
        if info.add_bos and bos and not want_text.startswith(bos):
            want_text = bos + want_text
            note = "the chat template renders no BOS but the tokenizer adds one (add_bos_token); compared with it"
            if note not in notes:
                notes.append(note)
        model_text = (bos if info.add_bos else "") + got_text
        if tok is not None:
            want = tok(want_text, add_special_tokens=False)["input_ids"]
            got = ([tok.bos_token_id] if info.add_bos else []) + tok(got_text, add_special_tokens=False)["input_ids"]
            same = want == got
            results.append(ConversationCheck(name, "identical" if same else "different", len(want), "tokens",
                                             "" if same else _token_diff(tok, want, got)))
        else:
            same = want_text == model_text
            results.append(ConversationCheck(name, "identical" if same else "different", len(want_text), "text",
                                             "" if same else _text_diff(want_text, model_text)))
    ok = all(c.status != "different" for c in results) and any(c.status == "identical" for c in results)
    if fam is not None and fam.note:
        notes.append(fam.note)
    return CheckResult(ok, family, results, notes)


def check_modelfile(modelfile_path, model_dir=None, *, use_tokenizer: bool = True) -> CheckResult:
    """Parse a Modelfile and compare its TEMPLATE's renderings with the chat template's.

    ``model_dir`` is the HF folder the model was trained from; without it the chat template is
    read from the GGUF named by FROM.
    """
    mf = read_modelfile(modelfile_path)
    template = mf.get("template")
    if not template:
        raise EdgetuneError("The Modelfile has no TEMPLATE.", where=str(modelfile_path), fix="add a TEMPLATE (edgetune ollama writes one)")
    base = Path(modelfile_path).resolve().parent
    src = mf.get("model") or ""
    gguf = Path(src).expanduser()
    gguf = gguf if gguf.is_absolute() else base / gguf
    info = model_info(gguf if gguf.exists() else None, model_dir) if (model_dir or gguf.exists()) else None
    if info is None:
        raise EdgetuneError(f"FROM {src} is not a local file and no --model-dir was given.", where=str(modelfile_path),
                            fix="pass --model-dir with the HF folder the model was trained from")
    fam = detect_family(info.chat_template) if info.chat_template else None
    return compare(template, info, mf.get("system"), family=fam.name if fam else None, use_tokenizer=use_tokenizer)
