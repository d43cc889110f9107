"""Chat-template families: one row per family, carrying both sides of the chat template.

A row holds how to recognise the family's Jinja chat template, the Ollama Go TEMPLATE that renders
the same text, the end-of-turn stop strings, and a training-side Jinja template offered to base
models that ship without one (``--chat-template NAME``, read by :mod:`edgetune.data.template`).
Adding a family is one row here; ``tests/test_chat_families.py`` checks that every row's two sides
render the same prompts. Pure data: training and export both import it, and it imports nothing of
edgetune's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .tool_syntax import SYNTAX_BY_NAME, Syntax

# Training-side Jinja templates (source: each family's reference tokenizer_config.json on the HF
# hub, without tool-calling preambles), rendered by transformers' apply_chat_template.
# ChatML (Qwen, SmolLM, OpenHermes, ...)
_JINJA_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 / 3.1 / 3.2 instruct (without the tool-calling preamble)
_JINJA_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma / Gemma 2 (no system role: a system message is prepended to the first user turn)
_JINJA_GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(sys='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.sys = message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.sys if loop.index0 == 1 and role == 'user' else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Mistral / Llama 2 style [INST] blocks
_JINJA_MISTRAL = (  # Mistral-7B-Instruct-v0.1's template, with a system message folded into the first user turn
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for message in msgs %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Phi-3 / Phi-3.5
_JINJA_PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Zephyr
_JINJA_ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Each row: a chat-template family, how to recognise its Jinja source, the Go template that
# renders the same text in Ollama, its end-of-turn stop strings, and (``jinja``) the training-side
# template above when the family offers one. Sources: each family's reference
# tokenizer_config.json chat_template (HF hub) and Ollama's own library templates.
# Placeholders: @DEFAULT@ (the template's built-in system prompt block, probed from the Jinja),
# @EOS@ (the model's eos token text). Every row iterates .Messages; a turn ending on a user
# message gets the generation prompt, one ending on an assistant message is closed like the
# training text (add_generation_prompt=False).
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"

# ---------------------------------------------------------------------------------- tool JSON in Go
# HF templates print tools and call arguments with Python's json.dumps (", " / ": " separators, or
# indent=4 for Llama, no HTML escaping); Ollama's ``json`` is Go's compact, HTML-escaping Marshal. So
# the tool rows print JSON with these defined templates instead: a type switch on ``printf "%T"``,
# strings through ``printf "%q"`` (identical to json.dumps for the strings the data stage accepts
# without a warning), numbers/bools/null through ``json``, and one template per Ollama type
# (template.templateTool, api.ToolProperty, ...) printing the canonical field order (edgetune.data.tools).
# With ``indent`` there is one copy per nesting level (Go templates take a single argument, so the
# depth is in the name); deeper schemas fail the check with "no such template".
_INDENT_LEVELS = 10


def _tool_json_defs(indent: int | None) -> dict[str, str]:
    levels = list(range(_INDENT_LEVELS)) if indent else [None]

    def n(kind, d, up=0):
        return kind if d is None else f"{kind}{d + up}"

    def lit(text):
        return "{{ " + json.dumps(text) + " }}" if text else ""

    def opn(d, br):
        return lit(br if d is None else br + "\n" + " " * indent * (d + 1))

    def sep(d):
        return ", " if d is None else ",\n" + " " * indent * (d + 1)

    def cls(d, br):
        return lit(br if d is None else "\n" + " " * indent * d + br)

    def obj(d, fields):  # fields: [(condition or None, key, value action)]
        body = '{{ $s := "" }}'
        for cond, key, value in fields:
            item = "{{ $s }}" + lit(json.dumps(key) + ": ") + value + "{{ $s = " + json.dumps(sep(d)) + " }}"
            body += f"{{{{ if {cond} }}}}{item}{{{{ end }}}}" if cond else item
        return opn(d, "{") + body + cls(d, "}")

    def seq(d, item_tpl, var="$v"):  # a non-empty list, items printed by item_tpl at level d+1
        return (opn(d, "[") + f"{{{{ range $i, {var} := . }}}}{{{{ if $i }}}}{lit(sep(d))}{{{{ end }}}}"
                + item_tpl + "{{ end }}" + cls(d, "]"))

    defs = {}
    for d in levels:
        j1 = n("j", d, 1)
        defs[n("j", d)] = (  # any JSON value (map[string]interface {}, []interface {}, string, float64, bool, nil)
            '{{ $t := printf "%T" . }}{{ if eq $t "string" }}{{ printf "%q" . }}'
            '{{ else if eq $t "map[string]interface {}" }}{{ if . }}' + opn(d, "{")
            + '{{ $s := "" }}{{ range $k, $v := . }}{{ $s }}{{ printf "%q" $k }}: {{ template "' + j1 + '" $v }}'
            + "{{ $s = " + json.dumps(sep(d)) + " }}{{ end }}" + cls(d, "}") + "{{ else }}{}{{ end }}"
            '{{ else if eq $t "[]interface {}" }}{{ if . }}' + seq(d, '{{ template "' + j1 + '" $v }}') + "{{ else }}[]{{ end }}"
            "{{ else }}{{ json . }}{{ end }}")
        defs[n("sl", d)] = seq(d, '{{ printf "%q" $v }}')  # a non-empty []string
        defs[n("pl", d)] = seq(d, '{{ template "' + n("p", d, 1) + '" $v }}')  # []api.ToolProperty
        props = ('{{ if . }}' + opn(d, "{") + '{{ $s := "" }}{{ range $k, $v := . }}{{ $s }}{{ printf "%q" $k }}: '
                 '{{ template "' + n("p", d, 1) + '" $v }}{{ $s = ' + json.dumps(sep(d)) + " }}{{ end }}"
                 + cls(d, "}") + "{{ else }}{}{{ end }}")
        defs[n("props", d)] = props  # map[string]api.ToolProperty, sorted
        defs[n("pm", d)] = "{{ with .ToMap }}" + props.replace("{{ if . }}", "", 1).removesuffix("{{ else }}{}{{ end }}") + "{{ else }}{}{{ end }}"
        typ = ('{{ if eq (len .Type) 1 }}{{ printf "%q" (index .Type 0) }}{{ else }}{{ with .Type }}'
               '{{ template "' + n("sl", d, 1) + '" . }}{{ end }}{{ end }}')
        defs[n("p", d)] = "{{ if or .AnyOf .Type .Items .Description .Enum .Properties .Required }}" + obj(d, [
            (".AnyOf", "anyOf", '{{ template "' + n("pl", d, 1) + '" .AnyOf }}'),
            (".Type", "type", typ),
            (".Items", "items", '{{ template "' + j1 + '" .Items }}'),
            (".Description", "description", '{{ printf "%q" .Description }}'),
            (".Enum", "enum", '{{ template "' + j1 + '" .Enum }}'),
            (".Properties", "properties", '{{ template "' + n("pm", d, 1) + '" .Properties }}'),
            (".Required", "required", '{{ template "' + n("sl", d, 1) + '" .Required }}'),
        ]) + "{{ else }}{}{{ end }}"
        defs[n("params", d)] = obj(d, [
            (None, "type", '{{ printf "%q" .Type }}'),
            (".Defs", "$defs", '{{ template "' + j1 + '" .Defs }}'),
            (".Items", "items", '{{ template "' + j1 + '" .Items }}'),
            (".Required", "required", '{{ template "' + n("sl", d, 1) + '" .Required }}'),
            (None, "properties", '{{ template "' + n("props", d, 1) + '" .Properties }}'),
        ])
        defs[n("fn", d)] = obj(d, [
            (None, "name", '{{ printf "%q" .Name }}'),
            (None, "description", '{{ printf "%q" .Description }}'),
            (None, "parameters", '{{ template "' + n("params", d, 1) + '" .Parameters }}'),
        ])
        defs[n("tool", d)] = obj(d, [(None, "type", '{{ printf "%q" .Type }}'),
                                     (None, "function", '{{ template "' + n("fn", d, 1) + '" .Function }}')])
        # template.templateArgs (call arguments): compact, as every tool family prints them
        defs[n("args", d)] = ('{{ if . }}{{ "{" }}{{ $s := "" }}{{ range $k, $v := . }}{{ $s }}{{ printf "%q" $k }}: '
                             '{{ template "' + n("j", d, 1) + '" $v }}{{ $s = ", " }}{{ end }}{{ "}" }}{{ else }}{}{{ end }}')
    return defs


def with_tool_json(main: str, indent: int | None = None) -> str:
    """``main`` followed by the ``define``s it uses (directly or through other defines)."""
    defs = _tool_json_defs(indent)
    if indent:  # args are compact (tojson without indent) whatever the tool schemas use
        defs.update({k: v for k, v in _tool_json_defs(None).items() if k in ("args", "j")})
    need, todo = [], re.findall(r'template "(\w+)"', main)
    while todo:
        name = todo.pop(0)
        if name in need or name not in defs:
            continue
        need.append(name)
        todo += re.findall(r'template "(\w+)"', defs[name])
    # after the main template, one per line: "{{-" trims the line breaks, so they print nothing
    return main + "".join(f'\n{{{{- define "{k}" }}}}{defs[k]}{{{{ end }}}}' for k in sorted(need))


_GEN = "{{ if and $last (ne .Role \"assistant\") }}"
_PREV_NEXT = ('{{ $next := "" }}{{ if not $last }}{{ $next = (index (slice $.Messages $i) 1).Role }}{{ end }}')
_FIRST_IS_SYS = '(eq (index .Messages 0).Role "system")'

# Qwen2.5 (Hermes-style tool calling): verbatim text of Qwen/Qwen2.5-*-Instruct's chat template.
_QWEN_TOOLS_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call><|im_end|>\n"
)
_GO_QWEN = with_tool_json(
    "{{ if .Tools }}<|im_start|>system\n{{ if " + _FIRST_IS_SYS + " }}{{ (index .Messages 0).Content }}{{ else }}@DEFSYS@{{ end }}"
    + _QWEN_TOOLS_HEAD + '{{ range .Tools }}\n{{ template "tool" . }}{{ end }}' + _QWEN_TOOLS_TAIL
    + "{{ else if " + _FIRST_IS_SYS + " }}<|im_start|>system\n{{ (index .Messages 0).Content }}<|im_end|>\n"
    "{{ else }}<|im_start|>system\n@DEFSYS@<|im_end|>\n{{ end }}"
    '{{ $prev := "" }}{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}' + _PREV_NEXT
    + '{{ if or (eq .Role "user") (and (eq .Role "system") (ne $i 0)) (and (eq .Role "assistant") (not .ToolCalls)) }}'
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant{{ if .Content }}\n{{ .Content }}{{ end }}'
    '{{ range .ToolCalls }}\n<tool_call>\n{"name": "{{ .Function.Name }}", "arguments": {{ template "args" .Function.Arguments }}}'
    "\n</tool_call>{{ end }}<|im_end|>\n"
    '{{ else if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}\n<tool_response>\n{{ .Content }}'
    '\n</tool_response>{{ if ne $next "tool" }}<|im_end|>\n{{ end }}{{ end }}'
    + _GEN + "<|im_start|>assistant\n{{ end }}{{ $prev = .Role }}{{ end }}"
)

# Qwen3: the same Hermes tools, no default system prompt, a <think> block on the assistant turns
# after the last user query (the last one always, earlier ones when they carry reasoning: Ollama's
# .Thinking, the Jinja template's reasoning_content), and thinking off (Ollama's think:false, i.e.
# .IsThinkSet and not .Think; the Jinja template's enable_thinking=false) prefills an empty block.
_GO_QWEN3 = with_tool_json(
    "{{ if .Tools }}<|im_start|>system\n{{ if " + _FIRST_IS_SYS + " }}{{ (index .Messages 0).Content }}\n\n{{ end }}"
    + _QWEN_TOOLS_HEAD.removeprefix("\n\n") + '{{ range .Tools }}\n{{ template "tool" . }}{{ end }}' + _QWEN_TOOLS_TAIL
    + "{{ else if " + _FIRST_IS_SYS + " }}<|im_start|>system\n{{ (index .Messages 0).Content }}<|im_end|>\n{{ end }}"
    '{{ $lu := -1 }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}{{ $lu = $i }}{{ end }}{{ end }}'
    '{{ $prev := "" }}{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}' + _PREV_NEXT
    + '{{ if or (eq .Role "user") (and (eq .Role "system") (ne $i 0)) }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ if and (gt $i $lu) (or $last .Thinking) }}'
    "<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}{{ .Content }}"
    '{{ range $j, $c := .ToolCalls }}{{ if or $j $m.Content }}\n{{ end }}<tool_call>\n{"name": "{{ $c.Function.Name }}", '
    '"arguments": {{ template "args" $c.Function.Arguments }}}\n</tool_call>{{ end }}<|im_end|>\n'
    '{{ else if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}\n<tool_response>\n{{ .Content }}'
    '\n</tool_response>{{ if ne $next "tool" }}<|im_end|>\n{{ end }}{{ end }}'
    + _GEN + "<|im_start|>assistant\n{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}{{ end }}"
    "{{ $prev = .Role }}{{ end }}"
)

# Llama 3.1/3.2/3.3 (tools in the first user message with tojson(indent=4), one call per turn as
# {"name", "parameters"}, results in the ipython role, printed with tojson).
_LLAMA_TOOLS_USER = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.Do not use variables.\n\n"
)
_GO_LLAMA31 = with_tool_json(
    "<|start_header_id|>system<|end_header_id|>\n\n{{ if .Tools }}Environment: ipython\n{{ end }}@PREAMBLE@"
    "{{ if " + _FIRST_IS_SYS + " }}{{ (index .Messages 0).Content }}{{ end }}<|eot_id|>"
    "{{ $fu := 0 }}{{ if " + _FIRST_IS_SYS + " }}{{ $fu = 1 }}{{ end }}"
    "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    '{{ if and (eq $i 0) (eq .Role "system") }}'
    "{{ else if and $.Tools (eq $i $fu) }}<|start_header_id|>user<|end_header_id|>\n\n" + _LLAMA_TOOLS_USER
    + '{{ range $.Tools }}{{ template "tool0" . }}\n\n{{ end }}{{ .Content }}<|eot_id|>'
    "{{ else if .ToolCalls }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ with index .ToolCalls 0 }}"
    '{"name": "{{ .Function.Name }}", "parameters": {{ template "args" .Function.Arguments }}}{{ end }}<|eot_id|>'
    '{{ else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>\n\n{{ printf "%q" .Content }}<|eot_id|>'
    "{{ else }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    + _GEN + "<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}{{ end }}",
    indent=4,
)

# Mistral-7B-Instruct-v0.3 ([AVAILABLE_TOOLS] before the last user turn, name/description printed
# raw, parameters and arguments with tojson; [TOOL_CALLS] with 9-character ids; the system prompt
# is prepended to the user turn only when it is the last message).
_GO_MISTRAL_TOOLS = with_tool_json(
    '{{ $sys := "" }}{{ if ' + _FIRST_IS_SYS + " }}{{ $sys = (index .Messages 0).Content }}{{ end }}"
    '{{ $lu := -1 }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}{{ $lu = $i }}{{ end }}{{ end }}'
    "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    '{{ if eq .Role "user" }}{{ if and $.Tools (eq $i $lu) }}[AVAILABLE_TOOLS] ['
    '{{ range $j, $t := $.Tools }}{{ if $j }}, {{ end }}{"type": "function", "function": {"name": "{{ $t.Function.Name }}", '
    '"description": "{{ $t.Function.Description }}", "parameters": {{ template "params" $t.Function.Parameters }}}}{{ end }}'
    "][/AVAILABLE_TOOLS]{{ end }}{{ if and $last $sys }}[INST] {{ $sys }}\n\n{{ .Content }}[/INST]"
    "{{ else }}[INST] {{ .Content }}[/INST]{{ end }}"
    "{{ else if .ToolCalls }}[TOOL_CALLS] [{{ range $j, $c := .ToolCalls }}{{ if $j }}, {{ end }}"
    '{"name": {{ printf "%q" $c.Function.Name }}, "arguments": {{ template "args" $c.Function.Arguments }}, '
    '"id": "{{ $c.ID }}"}{{ end }}]@EOS@'
    '{{ else if eq .Role "assistant" }} {{ .Content }}@EOS@'
    '{{ else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}, "call_id": "{{ .ToolCallID }}"}[/TOOL_RESULTS]'
    "{{ end }}{{ end }}"
)

# The training template offered as --chat-template qwen2.5 (a tool-capable template for base models
# without one): Qwen/Qwen2.5-0.5B-Instruct's tokenizer_config.json chat_template, verbatim.
_JINJA_QWEN25 = (Path(__file__).parent / "resources" / "templates" / "qwen2.5.jinja").read_text(encoding="utf-8")
# --chat-template qwen3 (a thinking-capable template: reasoning_content, enable_thinking, Hermes tools):
# Qwen/Qwen3's tokenizer_config.json chat_template, verbatim.
_JINJA_QWEN3 = (Path(__file__).parent / "resources" / "templates" / "qwen3.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Family:
    name: str
    detect: Callable[[str], bool]
    go: str
    stops: tuple[str, ...]
    jinja: str | None = None  # training template for --chat-template NAME (None: not offered)
    default_system: str | None = None  # regex over the rendering of [user "@U@"]; group 1 = default system
    default_block: str = ""  # Go text emitted when the first message is not a system message
    note: str = ""
    # (placeholder, regex over the rendering of [user "@U@"]): fixed text the Jinja template
    # always emits (e.g. Llama 3.1's knowledge-date preamble), copied into the Go template
    probes: tuple[tuple[str, str], ...] = ()
    # Tool calling: the name of the row of edgetune.tool_syntax.SYNTAXES the model's calls follow
    # ("" = the family has no tool syntax, the TEMPLATE renders no tools): "hermes"
    # (<tool_call>{json}</tool_call>), "llama3-json" (the whole turn is {"name", "parameters"}),
    # "mistral" ([TOOL_CALLS] [{name, arguments, id}]). See README "Tool calling". tests/test_tables.py
    # checks it against what tool_syntax.syntax_for detects in the family's template.
    tools: str = ""
    parallel_calls: bool = False  # several calls in one assistant turn

    def __post_init__(self):
        if self.tools and self.tools not in SYNTAX_BY_NAME:
            raise ValueError(f"family {self.name}: tools={self.tools!r} names no row of tool_syntax.SYNTAXES "
                             f"({', '.join(SYNTAX_BY_NAME)})")

    @property
    def syntax(self) -> Syntax | None:
        """The tool-call syntax row this family points at (None: no tool calls)."""
        return SYNTAX_BY_NAME[self.tools] if self.tools else None


FAMILIES: tuple[Family, ...] = (
    Family(
        "qwen2.5",  # Qwen2.5-*-Instruct: ChatML with a default system prompt and Hermes-style <tool_call> tools
        lambda j: "<|im_start|>" in j and "<tool_call>" in j and "You may call one or more functions" in j
        and "reasoning_content" not in j,
        _GO_QWEN,
        ("<|im_end|>", "<|im_start|>"),
        probes=(("@DEFSYS@", r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n@U@"),),
        jinja=_JINJA_QWEN25,
        tools="hermes",
        parallel_calls=True,
    ),
    Family(
        "qwen3",  # Qwen3 (hybrid thinking): Hermes-style tools, <think> block on the final answer
        lambda j: "<|im_start|>" in j and "<tool_call>" in j and "last_query_index" in j,
        _GO_QWEN3,
        ("<|im_end|>", "<|im_start|>"),
        jinja=_JINJA_QWEN3,
        note="assistant content holding '</think>' is split by the Jinja template (reasoning), not by Ollama: "
             "send reasoning as the message's thinking field; a user turn that is only <tool_response> text "
             "counts as a query in Ollama",
        tools="hermes",
        parallel_calls=True,
    ),
    Family(
        "chatml",  # ChatML: OpenHermes, Qwen/Qwen2/Qwen2.5 (default system), SmolLM/SmolLM2 (default system)
        lambda j: "<|im_start|>" in j,
        "@DEFAULT@{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
        "{{- if ne .Role \"tool\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}\n"
        "{{- if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n{{ end }}\n"
        "{{- end }}",
        ("<|im_end|>", "<|im_start|>"),
        default_system=r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n@U@",
        default_block="{{- if ne (index .Messages 0).Role \"system\" }}<|im_start|>system\n@TEXT@<|im_end|>\n{{ end }}\n",
        jinja=_JINJA_CHATML,
    ),
    Family(
        "llama3.1",  # Llama-3.1/3.2/3.3-Instruct: a system header is always sent, with a dated preamble
        lambda j: "<|start_header_id|>" in j and "Cutting Knowledge Date" in j,
        _GO_LLAMA31,
        ("<|eot_id|>", "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>"),
        probes=(("@PREAMBLE@", r"^<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),),
        note="the template's 'Today Date' is frozen at export time; "
             "the Jinja template trims each message's content, Ollama passes it unchanged; "
             "one tool call per turn (the template rejects parallel calls; Ollama would render only the first)",
        tools="llama3-json",
    ),
    Family(
        "llama3",  # Meta-Llama-3-8B-Instruct; BOS comes from the tokenizer (add_bos_token)
        lambda j: "<|start_header_id|>" in j,
        "{{- range $i, $_ := .Messages }}\n" + _LAST[:-2] + "-}}\n"
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- if and $last (ne .Role \"assistant\") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n"
        "{{- end }}",
        ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
        note="the Jinja template trims each message's content; Ollama passes content unchanged",
        jinja=_JINJA_LLAMA3,
    ),
    Family(
        "phi3",  # microsoft/Phi-3-mini-4k-instruct (template with system role)
        lambda j: "<|end|>" in j and "<|assistant|>" in j,
        "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
        "{{- if or (eq .Role \"system\") (eq .Role \"user\") (eq .Role \"assistant\") }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}\n"
        "{{- if $last }}{{ if ne .Role \"assistant\" }}<|assistant|>\n{{ else }}@EOS@{{ end }}{{ end }}\n"
        "{{- end }}",
        ("<|end|>", "<|user|>", "<|assistant|>"),
        jinja=_JINJA_PHI3,
    ),
    Family(
        "zephyr",  # HuggingFaceH4/zephyr-7b-beta
        lambda j: "<|user|>" in j and "<|assistant|>" in j,
        "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
        "{{- if or (eq .Role \"system\") (eq .Role \"user\") (eq .Role \"assistant\") }}<|{{ .Role }}|>\n{{ .Content }}@EOS@\n{{ end }}\n"
        "{{- if and $last (ne .Role \"assistant\") }}<|assistant|>\n{{ end }}\n"
        "{{- end }}",
        ("<|user|>", "<|assistant|>", "<|system|>"),
        jinja=_JINJA_ZEPHYR,
    ),
    Family(
        "gemma",  # google/gemma-2-2b-it, gemma-7b-it; Gemma 3 folds a system message into the first user turn
        lambda j: "<start_of_turn>" in j,
        "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
        "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
        "{{ if and (eq $i 1) (eq (index $.Messages 0).Role \"system\") }}{{ (index $.Messages 0).Content }}\n\n{{ end }}"
        "{{ .Content }}<end_of_turn>\n"
        "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}\n"
        "{{- if and $last (ne .Role \"assistant\") }}<start_of_turn>model\n{{ end }}\n"
        "{{- end }}",
        ("<end_of_turn>", "<start_of_turn>"),
        note="Gemma 1/2 templates reject a system message; Ollama's SYSTEM is folded into the first user turn as Gemma 3 does",
        jinja=_JINJA_GEMMA,
    ),
    Family(
        "mistral-tools",  # mistralai/Mistral-7B-Instruct-v0.3 ([AVAILABLE_TOOLS] / [TOOL_CALLS] / [TOOL_RESULTS])
        lambda j: "[AVAILABLE_TOOLS]" in j and "[INST]" in j,
        _GO_MISTRAL_TOOLS,
        ("[INST]", "[/INST]"),
        note="tool call ids must be 9 alphanumeric characters (the template rejects others); "
             "the template prepends the system prompt only to a final user turn and trims assistant content",
        tools="mistral",
        parallel_calls=True,
    ),
    Family(
        "mistral",  # mistralai/Mistral-7B-Instruct-v0.1, Mixtral-8x7B-Instruct-v0.1
        lambda j: "[INST]" in j,
        "{{- range $i, $_ := .Messages }}\n"
        "{{- if eq .Role \"user\" }}[INST] "
        "{{ if and (eq $i 1) (eq (index $.Messages 0).Role \"system\") }}{{ (index $.Messages 0).Content }}\n\n{{ end }}"
        "{{ .Content }} [/INST]\n"
        "{{- else if eq .Role \"assistant\" }}{{ .Content }}@EOS@\n"
        "{{- end }}\n"
        "{{- end }}",
        ("[INST]", "[/INST]"),
        note="the v0.1 template rejects a system message; Ollama's SYSTEM is prepended to the first user turn",
        jinja=_JINJA_MISTRAL,
    ),
    Family(
        "alpaca",  # Alpaca-style "### Instruction: / ### Response:" chat templates
        lambda j: "### Instruction" in j,
        "@DEFAULT@{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
        "{{- if eq .Role \"system\" }}{{ .Content }}\n\n"
        "{{ else if eq .Role \"user\" }}### Instruction:\n{{ .Content }}\n\n"
        "{{ else if eq .Role \"assistant\" }}### Response:\n{{ .Content }}@EOS@\n\n{{ end }}\n"
        "{{- if and $last (ne .Role \"assistant\") }}### Response:\n{{ end }}\n"
        "{{- end }}",
        ("### Instruction:",),
        default_system=r"^(.*?)\n\n### Instruction:\n@U@",
        default_block="{{- if ne (index .Messages 0).Role \"system\" }}@TEXT@\n\n{{ end }}\n",
    ),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


def detect_family(jinja: str) -> Family | None:
    """The family of a Jinja chat template: the row whose training template it is, else the first
    row whose ``detect`` matches (rows are ordered most specific first)."""
    for fam in FAMILIES:
        if fam.jinja is not None and jinja == fam.jinja:
            return fam
    for fam in FAMILIES:
        if fam.detect(jinja):
            return fam
    return None


def training_templates() -> dict[str, str]:
    """family name -> training Jinja template, for the families that offer one."""
    return {f.name: f.jinja for f in FAMILIES if f.jinja is not None}
