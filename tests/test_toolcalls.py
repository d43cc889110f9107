"""Tool calls: each family's call syntax parsed from real-format replies, the streaming splitter,
and `edgetune serve` answering OpenAI tool requests over HTTP (official openai client) from a
tiny real GGUF whose template is the shipped Hermes-style smollm2-tools template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune.toolcalls import (
    INVALID,
    SYNTAX_BY_NAME,
    StreamSplitter,
    canonical_request,
    finish_for,
    parse_calls,
    prepare_messages,
    syntax_for,
)

TEMPLATES = Path(__file__).parent / "templates"
TOOLS_TEMPLATE = Path(__file__).resolve().parents[1] / "edgetune" / "resources" / "demo" / "smollm2-tools.jinja"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                      "parameters": {"type": "object", "required": ["city"], "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "convert_units", "description": "Convert units.",
                                      "parameters": {"type": "object", "required": ["value"], "properties": {
                                          "value": {"type": "number"}}}}},
]
# bounded arguments: a random tiny model constrained by this schema's grammar finishes its call
UNIT_TOOL = {"type": "function", "function": {"name": "set_unit", "description": "Choose the temperature unit.",
                                              "parameters": {"type": "object", "required": ["unit"], "additionalProperties": False,
                                                             "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}}}}
HERMES, LLAMA, MISTRAL = SYNTAX_BY_NAME["hermes"], SYNTAX_BY_NAME["llama3-json"], SYNTAX_BY_NAME["mistral"]


@pytest.mark.parametrize("name,syntax", [("qwen2.5", "hermes"), ("llama3.2", "llama3-json"), ("mistral-v0.3", "mistral"),
                                         ("smollm2", None),
                                         ("mistral", None), ("llama3", None), ("chatml", None), ("gemma", None)])
def test_syntax_detected_from_real_templates(name, syntax):
    s = syntax_for((TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"))
    assert (s.name if s else None) == syntax
    assert syntax_for(TOOLS_TEMPLATE.read_text(encoding="utf-8")) is HERMES


def test_hermes_content_and_parallel_calls():
    text = ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tökyö & <Osaka>"}}\n</tool_call>')
    p = parse_calls(text, HERMES, TOOLS)
    assert p.error is None and p.attempted and p.content == "Let me check both."
    assert p.calls == [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                       {"name": "get_weather", "arguments": {"city": "Tökyö & <Osaka>"}}]
    assert finish_for(p, "stop") == "tool_calls"
    # a reply cut before </tool_call> (the end-of-turn stopped it) still holds a whole call
    assert parse_calls('<tool_call>\n{"name": "convert_units", "arguments": "{\\"value\\": 3}"}', HERMES, TOOLS).calls == \
        [{"name": "convert_units", "arguments": {"value": 3}}]


@pytest.mark.parametrize("text,why", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>', "not valid JSON"),
    ('<tool_call>\n{"name": "book_flight", "arguments": {}}\n</tool_call>', "not one of the declared tools"),
    ('<tool_call>\n{"name": "get_weather", "arguments": ["Paris"]}\n</tool_call>', "not an object"),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', "no tool name"),
    ("<tool_call>\n", "holds no call"),
])
def test_malformed_hermes_calls_say_why_and_keep_the_raw_text(text, why):
    p = parse_calls(text, HERMES, TOOLS)
    assert p.calls == [] and p.attempted and why in p.error
    assert p.content == text and finish_for(p, "stop") == INVALID
    assert finish_for(p, "length") == "length"  # cut off mid-call: the runtime's own reason


def test_plain_answers_are_not_calls():
    for syntax in (HERMES, LLAMA, MISTRAL, None):
        p = parse_calls("It is sunny in Paris.", syntax, TOOLS)
        assert (p.content, p.calls, p.error, p.attempted) == ("It is sunny in Paris.", [], None, False)
        assert finish_for(p, "stop") == "stop"


def test_llama3_json_calls():
    p = parse_calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}', LLAMA, TOOLS)
    assert p.calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}] and p.content == ""
    p = parse_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                    '{"name": "convert_units", "parameters": {"value": 1.5}}', LLAMA, TOOLS)
    assert [c["name"] for c in p.calls] == ["get_weather", "convert_units"]
    bad = parse_calls('{"name": "get_weather", "parameters": {"city": }', LLAMA, TOOLS)
    assert bad.error and not bad.calls


def test_mistral_calls_with_and_without_the_control_token():
    body = '[{"name": "get_weather", "arguments": {"city": "Lima"}, "id": "abcdefghi"}, {"name": "convert_units", "arguments": {"value": 2}, "id": "bcdefghij"}]'
    for text in ("[TOOL_CALLS] " + body, body):  # a detokenizer that drops control tokens leaves the bare list
        p = parse_calls(text, MISTRAL, TOOLS)
        assert p.error is None and [c["arguments"] for c in p.calls] == [{"city": "Lima"}, {"value": 2}]
    p = parse_calls('[TOOL_CALLS]get_weather[ARGS]{"city": "Lima"}', MISTRAL, TOOLS)
    assert p.calls == [{"name": "get_weather", "arguments": {"city": "Lima"}}]
    assert parse_calls("[TOOL_CALLS] {}", MISTRAL, TOOLS).error


def _stream(syntax, text: str, step: int = 1) -> tuple[str, str]:
    s = StreamSplitter(syntax)
    sent = "".join(s.feed(text[i:i + step]) for i in range(0, len(text), step))
    return sent, s.held


def test_streaming_sends_content_and_holds_calls_back():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for step in (1, 3, 100):
        assert _stream(HERMES, "Checking.\n" + call, step) == ("Checking.\n", call)
        assert _stream(HERMES, "a <tool_ thing", step) == ("a <tool_ thing", "") or step == 100
        assert _stream(LLAMA, '{"name": "get_weather", "parameters": {}}', step)[0] == ""
        assert _stream(LLAMA, "Hello {there}", step) == ("Hello {there}", "")
        assert _stream(MISTRAL, '[TOOL_CALLS] [{"name": "x"}]', step)[0] == ""
    # a partial opener at the end is held until it is known not to open a call
    s = StreamSplitter(HERMES)
    assert s.feed("a <tool") == "a " and s.held == "<tool"
    assert s.feed("box>") == "<toolbox>"


def test_history_arguments_render_as_the_training_data_did(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = (TEMPLATES / "qwen2.5.jinja").read_text(encoding="utf-8")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    trained = [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "content": "18", "tool_call_id": "call_1"}]
    sent = json.loads(json.dumps(trained))  # what an OpenAI client sends: arguments as a compact JSON string
    sent[1]["tool_calls"][0]["function"]["arguments"] = '{"city":"Paris"}'
    sent[1]["content"] = None

    def render(msgs):
        return tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True)

    assert render(prepare_messages(sent)) == render(trained)
    assert '"arguments": {"city": "Paris"}' in render(trained)


def test_request_tools_take_the_training_datas_canonical_form():
    """A client's property order, argument key order and 2.0-style numbers do not change the prompt."""
    shuffled = json.loads(json.dumps(TOOLS))
    props = shuffled[0]["function"]["parameters"]["properties"]
    shuffled[0]["function"]["parameters"]["properties"] = dict(reversed(list(props.items())))
    history = [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "convert_units", "arguments": '{"value": 2.0}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    m1, t1 = canonical_request(history, shuffled)
    m2, t2 = canonical_request(history, TOOLS)
    assert t1 == t2 and list(t1[0]["function"]["parameters"]["properties"]) == ["city", "unit"]
    assert m1 == m2 and m1[1]["tool_calls"][0]["function"]["arguments"] == {"value": 2}
    # a request that does not validate is rendered as sent, never refused here
    bad = [{"role": "user", "content": "x"}, {"role": "tool", "content": "orphan result"}]
    assert canonical_request(bad, TOOLS)[0] == bad


# ------------------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def tools_gguf(tiny_tools_model) -> Path:
    """The tiny random llama as an f32 GGUF whose chat template is the shipped smollm2-tools one."""
    return tiny_tools_model[1]


@pytest.fixture(scope="module")
def tool_server(tools_gguf):
    from edgetune.serve import make_server

    with make_server(tools_gguf, port=None, n_ctx=2048, n_threads=1, alias="tiny") as srv:
        yield srv


MSGS = [{"role": "user", "content": "What's the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "set_unit"}}


def test_named_tool_choice_returns_openai_tool_calls(tool_server):
    from openai import OpenAI

    client = OpenAI(base_url=tool_server.base_url, api_key="none")
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS + [UNIT_TOOL], tool_choice=NAMED,
                                       max_tokens=48, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "set_unit" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["unit"] in ("celsius", "fahrenheit")  # constrained to the schema
    # the tools went into the prompt through the GGUF's template (three schemas: hundreds of tokens)
    plain = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 100


def test_streamed_tool_call_matches_the_non_streamed_one(tool_server):
    from openai import OpenAI

    client = OpenAI(base_url=tool_server.base_url, api_key="none")
    kw = dict(model="tiny", messages=MSGS, tools=TOOLS + [UNIT_TOOL], tool_choice=NAMED, max_tokens=48, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "set_unit"
    assert json.loads(deltas[0].function.arguments) == json.loads(full.function.arguments)  # greedy: same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_call_is_reported_not_a_crash(tool_server, stream):
    """tool_choice=required prefills '<tool_call>'; a logit bias makes the model end its turn at
    once, so the call it started is empty: the answer says so and carries the raw text."""
    from openai import OpenAI

    client = OpenAI(base_url=tool_server.base_url, api_key="none")
    eos = 2  # <|im_end|> in the SmolLM2 tokenizer
    kw = dict(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required", max_tokens=8, temperature=0,
              logit_bias={str(eos): 100})
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        text, reason = choice.message.content, choice.finish_reason
        assert not choice.message.tool_calls
    assert reason == INVALID and text.startswith("<tool_call>")
    # the server is still fine: a plain request after it is answered normally
    after = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).choices[0]
    assert after.finish_reason in ("stop", "length") and not after.message.tool_calls


def test_tool_history_and_tool_choice_none_over_http(tool_server):
    from openai import OpenAI

    client = OpenAI(base_url=tool_server.base_url, api_key="none")
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls", INVALID)
    none = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none",
                                          max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens < r.usage.prompt_tokens  # rendered without the tool schemas
    assert not none.choices[0].message.tool_calls


@pytest.mark.slow
def test_a_template_without_tools_serves_plain_answers(demo_gguf_path):
    """SmolLM2's own template has no tool syntax: tools are accepted, the answer is plain text."""
    from openai import OpenAI

    from edgetune.serve import make_server

    with make_server(demo_gguf_path, port=None, n_ctx=1024, n_threads=2, alias="smol") as srv:
        client = OpenAI(base_url=srv.base_url, api_key="none")
        kw = dict(model="smol", messages=MSGS, max_tokens=6, temperature=0)
        with_tools = client.chat.completions.create(**kw, tools=TOOLS).choices[0]
        plain = client.chat.completions.create(**kw).choices[0]
    assert not with_tools.message.tool_calls and with_tools.finish_reason in ("stop", "length")
    assert with_tools.message.content == plain.message.content  # the template ignores tools: same prompt
