"""Tools survive the Modelfile: for every family with tool syntax, the TEMPLATE renders declared
tools, assistant tool calls and tool results exactly as the family's real Jinja template does
(tools with <, &, quotes, newlines, non-ASCII, enums, nested objects; several tools; parallel calls
where the family allows them), and families without tool syntax say so. Plus the Go-template and
Go-value features this needs (define/template, %T, %q, json, sorted map ranges)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgetune import gotemplate
from edgetune.chat_families import FAMILY_BY_NAME
from edgetune.data.formats import normalise
from edgetune.export.model_info import ModelInfo
from edgetune.gotemplate.values import go_fmt_float, go_json, go_json_float, strconv_quote, template_tools
from edgetune.jinja import render_jinja
from edgetune.ollama.check import compare
from edgetune.ollama.modelfile import build_modelfile
from edgetune.ollama.template import go_template_for, render_ollama

TEMPLATES = Path(__file__).parent / "templates"
META = {k: v for k, v in json.loads((TEMPLATES / "families.json").read_text()).items() if not k.startswith("_")}
TOOL_FIXTURES = {"qwen2.5": "hermes", "qwen3": "hermes", "llama3.2": "llama3-json", "mistral-v0.3": "mistral"}


def _info(name: str) -> ModelInfo:
    m = META[name]
    return ModelInfo(chat_template=(TEMPLATES / f"{name}.jinja").read_text(), bos_token=m["bos_token"],
                     eos_token=m["eos_token"], add_bos=m["add_bos_token"], source=name, context_length=4096)


@pytest.mark.parametrize("system", [None, "Answer briefly."], ids=["no-system", "modelfile-system"])
@pytest.mark.parametrize("name", sorted(TOOL_FIXTURES))
def test_tool_conversations_are_identical(name, system):
    info = _info(name)
    fam, go = go_template_for(info)
    assert fam.tools == TOOL_FIXTURES[name]
    assert gotemplate.uses_field(go, "Tools")  # what makes Ollama offer tools for the model
    result = compare(go, info, system, family=fam.name, use_tokenizer=False)
    assert result.ok, result.diff
    tool_convs = {c.name: c.status for c in result.conversations if c.name.startswith("tools:")}
    assert set(tool_convs.values()) == {"identical"}
    assert {"tools: request", "tools: call (training example)", "tools: call, result, answer",
            "tools: system, call, result, answer", "tools: two rounds, several tools"} <= set(tool_convs)
    assert ("tools: parallel calls, results, answer" in tool_convs) == fam.parallel_calls
    if not fam.parallel_calls:
        assert any("parallel calls are not checked" in n for n in result.notes)


def test_family_rows_declare_tool_syntax():
    assert {f: FAMILY_BY_NAME[f].tools for f in ("qwen2.5", "llama3.1", "mistral-tools")} == {
        "qwen2.5": "hermes", "llama3.1": "llama3-json", "mistral-tools": "mistral"}
    assert FAMILY_BY_NAME["qwen2.5"].parallel_calls and FAMILY_BY_NAME["mistral-tools"].parallel_calls
    assert not FAMILY_BY_NAME["llama3.1"].parallel_calls


def _conv():
    tools = [{"type": "function", "function": {"name": "lookup", "description": 'Find <b>&"x"</b>\nnaïve ☕',
                                                "parameters": {"type": "object", "properties": {
                                                    "q": {"type": "string"}, "opts": {"type": "object", "properties": {
                                                        "z": {"type": "integer"}, "a": {"type": "boolean"}}}}}}}]
    msgs = [{"role": "user", "content": "find it"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "abcdefghi", "type": "function", "function": {"name": "lookup", "arguments": {
                    "q": 'a<b & "c"\n€', "opts": {"z": 3, "a": True}}}},
                {"id": "bcdefghij", "type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}]},
            {"role": "tool", "content": "r1", "tool_call_id": "abcdefghi"},
            {"role": "tool", "content": "r2", "tool_call_id": "bcdefghij"},
            {"role": "assistant", "content": "done"}]
    rec = normalise({"messages": msgs, "tools": tools})
    return rec.messages, rec.tools


def test_qwen_text_by_hand_keeps_python_json_not_go_json():
    """Independent of compare(): the Jinja and Ollama renderings, and what they contain."""
    info = _info("qwen2.5")
    _, go = go_template_for(info)
    msgs, tools = _conv()
    want = render_jinja(info.chat_template, msgs, add_generation_prompt=False, bos_token=None, eos_token="<|im_end|>", tools=tools)
    got = render_ollama(go, msgs, None, tools)
    assert got == want
    assert '"description": "Find <b>&\\"x\\"</b>\\nnaïve ☕"' in got  # no \u003c, no \u00ef: Python's json.dumps
    assert '{"name": "lookup", "arguments": {"opts": {"a": true, "z": 3}, "q": "a<b & \\"c\\"\\n€"}}' in got
    assert got.count("<tool_call>\n{\"name\": \"lookup\"") == 2  # one block per parallel call
    assert "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>" in got


def test_a_template_printing_go_json_is_caught():
    info = _info("qwen2.5")
    fam, go = go_template_for(info)
    broken = go.replace('{{ if eq $t "string" }}{{ printf "%q" . }}', '{{ if eq $t "string" }}{{ json . }}')
    assert broken != go
    result = compare(broken, info, None, family=fam.name, use_tokenizer=False)
    assert not result.ok
    bad = {c.name for c in result.conversations if c.status == "different"}
    assert bad and all(n.startswith("tools:") for n in bad)
    assert "\\u0026" in result.diff or "\\u003c" in result.diff


@pytest.mark.parametrize("name", ["smollm2", "llama3", "phi3"])
def test_families_without_tool_syntax_say_so(tmp_path, name, family_meta_gguf):
    info = _info(name)
    fam, go = go_template_for(info)
    assert not fam.tools and not gotemplate.uses_field(go, "Tools")
    result = compare(go, info, None, family=fam.name, use_tokenizer=False)
    assert result.ok and not any(c.name.startswith("tools:") for c in result.conversations)
    assert any(n.startswith("tools are not rendered") for n in result.notes)
    text, _ = build_modelfile(family_meta_gguf(tmp_path / "m.gguf", name), tmp_path, "m")
    assert "# Tools: NOT rendered" in text


def test_modelfile_header_says_tools_are_rendered(tmp_path, family_meta_gguf):
    text, result = build_modelfile(family_meta_gguf(tmp_path / "m.gguf", "mistral-v0.3"), tmp_path, "m")
    assert "# Tools: rendered (mistral call syntax, parallel calls allowed" in text
    assert result.ok and any(c.name == "tools: parallel calls, results, answer" for c in result.conversations)


def test_tool_conversations_token_identical_with_a_real_tokenizer(tmp_path, tokenizer_dir):
    """The SmolLM2 tokenizer carrying the Qwen2.5 template (what --chat-template qwen2.5 trains with)."""
    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (TEMPLATES / "qwen2.5.jinja").read_text()
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    info = ModelInfo(chat_template=cfg["chat_template"], bos_token=None, eos_token="<|im_end|>", add_bos=False,
                     source=str(d), tokenizer_dir=d)
    fam, go = go_template_for(info)
    result = compare(go, info, None, family=fam.name)
    assert result.ok, result.diff
    tools = [c for c in result.conversations if c.name.startswith("tools:")]
    assert len(tools) == 7 and {c.compared for c in tools} == {"tokens"} and all(c.status == "identical" for c in tools)


# ------------------------------------------------------------------ Go template and Go values
def test_define_template_recursion_and_type_switch():
    src = ('{{ define "v" }}{{ $t := printf "%T" . }}{{ if eq $t "map[string]interface {}" }}{{ "{" }}'
           '{{ range $k, $v := . }}{{ $k }}={{ template "v" $v }};{{ end }}{{ "}" }}{{ else if eq $t "[]interface {}" }}'
           '[{{ range $i, $v := . }}{{ if $i }},{{ end }}{{ template "v" $v }}{{ end }}]{{ else }}{{ $t }}:{{ . }}{{ end }}{{ end }}'
           '{{ template "v" .X }}')
    out = gotemplate.render(src, {"X": {"b": [1.0, "s", None], "a": {"y": True, "x": 1234567.0}}})
    assert out == "{a={x=float64:1.234567e+06;y=bool:true;};b=[float64:1,string:s,<nil>:<no value>];}"


def test_go_values_print_like_go():
    assert [go_fmt_float(x) for x in (3.0, 2.5, 1e6, 123456.0, 1e-5, 1e21)] == ["3", "2.5", "1e+06", "123456", "1e-05", "1e+21"]
    assert [go_json_float(x) for x in (3.0, 1e6, 1e-7, 1e21, 0.1)] == ["3", "1000000", "1e-7", "1e+21", "0.1"]
    assert strconv_quote('a"b\\ é\n\t\x07\x01\x7f\u00ad☕') == '"a\\"b\\\\ é\\n\\t\\a\\x01\\x7f\\u00ad☕"'
    assert go_json({"b": "<&>", "a": [1.0, None, True]}) == '{"a":[1,null,true],"b":"\\u003c\\u0026\\u003e"}'
    tools = template_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "b": {"type": "string", "description": "x"}, "a": {"type": ["integer", "null"], "enum": [1, 2]}}}}}])
    # Ollama's {{ .Tools }} / {{ json }}: struct field order, sorted properties, compact, description always present
    assert gotemplate.render("{{ .Tools }}", {"Tools": tools}) == (
        '[{"type":"function","function":{"name":"f","description":"","parameters":{"type":"object","properties":'
        '{"a":{"type":["integer","null"],"enum":[1,2]},"b":{"type":"string","description":"x"}}}}}]')
    assert gotemplate.render("{{ range .Tools }}{{ range $k, $p := .Function.Parameters.Properties }}{{ $k }}:{{ $p.Type }};"
                             "{{ end }}{{ end }}", {"Tools": tools}) == "a:[integer null];b:string;"


@pytest.mark.parametrize("src, msg", [
    ('{{ template "nope" . }}', 'no such template "nope"'),
    ('{{ define "r" }}{{ template "r" . }}{{ end }}{{ template "r" . }}', "nests deeper"),
    ("{{ range .T }}{{ end }}", "range can't iterate"),
    ("{{ .T }}", "printing a"),
    ('{{ printf "%q" 3 }}', "%q of a int"),
    ('{{ if .X }}{{ define "x" }}{{ end }}{{ end }}', "top level"),
])
def test_unsupported_or_wrong_uses_are_refused(src, msg):
    from edgetune.gotemplate.values import GoStruct

    with pytest.raises(gotemplate.GoTemplateError, match=msg):
        gotemplate.render(src, {"T": GoStruct("api.Thing", {"A": 1}), "X": True})


def test_a_tool_template_outside_the_tool_rows_is_reported_as_losing_tools():
    """A Hermes-style template edgetune has no tool row for (here: Qwen2.5's with its tool instructions
    reworded) falls back to plain ChatML: the check passes for chats and says the tools are lost."""
    jinja = (TEMPLATES / "qwen2.5.jinja").read_text().replace("You may call one or more functions", "Call functions")
    info = ModelInfo(chat_template=jinja, bos_token=None, eos_token="<|im_end|>", add_bos=False, source="hermes-like")
    fam, go = go_template_for(info)
    assert fam.name == "chatml"
    result = compare(go, info, None, family=fam.name, use_tokenizer=False)
    assert result.ok
    assert any("tools are not rendered" in n and "they are lost in Ollama" in n for n in result.notes)
