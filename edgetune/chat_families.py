"""Chat-template families: one row per family, carrying both sides of the chat template.

A row holds how to recognise the family's Jinja chat template, the Ollama Go TEMPLATE that renders
the same text, the end-of-turn stop strings, and a training-side Jinja template offered to base
models that ship without one (``--chat-template NAME``, read by :mod:`edgetune.data.template`).
Adding a family is one row here; ``tests/test_chat_families.py`` checks that every row's two sides
render the same prompts. Pure data: training and export both import it, and it imports nothing of
edgetune's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    # Tool calling: the call syntax the model emits ("" = the family has no tool syntax, the TEMPLATE
    # renders no tools): "hermes" (<tool_call>{json}</tool_call>), "llama3-json" (the whole turn is
    # {"name", "parameters"}), "mistral" ([TOOL_CALLS] [{name, arguments, id}]). See README "Tool calling".
    tools: str = ""
    parallel_calls: bool = False  # several calls in one assistant turn


FAMILIES: tuple[Family, ...] = (
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
        note="tool calls / tool results are not rendered (the Jinja tool branches have no Go counterpart here)",
        jinja=_JINJA_CHATML,
    ),
    Family(
        "llama3.1",  # Llama-3.1/3.2/3.3-Instruct: a system header is always sent, with a dated preamble
        lambda j: "<|start_header_id|>" in j and "Cutting Knowledge Date" in j,
        "<|start_header_id|>system<|end_header_id|>\n\n@PREAMBLE@"
        "{{ if eq (index .Messages 0).Role \"system\" }}{{ (index .Messages 0).Content }}{{ end }}<|eot_id|>\n"
        "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
        "{{- if not (and (eq $i 0) (eq .Role \"system\")) }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n{{- end }}\n"
        "{{- if and $last (ne .Role \"assistant\") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n"
        "{{- end }}",
        ("<|eot_id|>", "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>"),
        probes=(("@PREAMBLE@", r"^<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),),
        note="the template's 'Today Date' is frozen at export time; tool calls are not rendered; "
             "the Jinja template trims each message's content, Ollama passes it unchanged",
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
