"""Tool-use records: line-by-line validation, the canonical form (recorded in the data card),
ShareGPT function-call conversion, rendering with ``tools=`` and completion-only loss on tool-call
turns (tool results not scored) — on the real SmolLM2 tokenizer with the real Qwen2.5 template."""

from __future__ import annotations

import json

import pytest

from edgetune.config import DataConfig
from edgetune.data.formats import normalise
from edgetune.data.preparation import prepare, validate
from edgetune.data.problems import Problem
from edgetune.data.template import encode_example, load_tokenizer
from edgetune.data.tools import ollama_differences

TOOLS = [{"type": "function", "function": {
    "description": "Weather for a city", "name": "get_weather",
    "parameters": {"properties": {"unit": {"enum": ["c", "f"], "type": "string", "default": "c"},
                                  "city": {"description": "City", "type": "string", "minLength": 1}},
                   "required": ["city"], "type": "object", "additionalProperties": False}}}]


def _row(calls_args='{"unit": "c", "city": "Paris", "n": 2.0, "z": {"b": 1, "a": [1.0, 2.5]}}', **extra):
    return {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": calls_args}}]},
        {"role": "tool", "tool_call_id": "call00001", "content": {"temp": 18}},
        {"role": "assistant", "content": "It is 18 degrees."}], "tools": TOOLS, **extra}


def test_canonical_form_and_notes():
    rec = normalise(_row())
    row = rec.to_row("chat")
    assert row["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "City"}, "unit": {"type": "string", "enum": ["c", "f"]}}}}}]
    # key order is part of the form (json.dumps in the training template prints insertion order)
    assert list(row["tools"][0]["function"]["parameters"]) == ["type", "required", "properties"]
    assert list(row["tools"][0]["function"]["parameters"]["properties"]) == ["city", "unit"]
    call = row["messages"][1]
    assert call == {"role": "assistant", "content": "", "tool_calls": [{"id": "call00001", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "n": 2, "unit": "c", "z": {"a": [1, 2.5], "b": 1}}}}]}
    assert list(call["tool_calls"][0]["function"]["arguments"]["z"]) == ["a", "b"]
    assert row["messages"][2] == {"role": "tool", "content": '{"temp": 18}', "tool_call_id": "call00001"}
    notes = rec.tool_notes.as_dict()
    assert notes["dropped"] == {"default": 1, "minLength": 1, "additionalProperties": 1}
    assert notes["converted"]["arguments given as a JSON string"] == 1
    assert notes["calls"] == 1


@pytest.mark.parametrize("mutate, code, field", [
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="get_time"), "bad_tool_call",
     "messages[1].tool_calls[0].function.name"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="[1, 2]"), "bad_tool_call",
     "messages[1].tool_calls[0].function.arguments"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{oops"), "bad_tool_call",
     "messages[1].tool_calls[0].function.arguments"),
    (lambda r: r["messages"][2].update(tool_call_id="call99999"), "tool_order", "messages[2].tool_call_id"),
    (lambda r: r["messages"][2].update(name="other"), "tool_order", "messages[2].name"),
    (lambda r: r["messages"].insert(3, {"role": "tool", "content": "again"}), "tool_order", "messages[3].role"),
    (lambda r: r.update(tools=[{"type": "function", "function": {"name": "get weather"}}]), "bad_tools", "tools[0].function.name"),
    (lambda r: r["tools"][0]["function"]["parameters"]["properties"]["city"].update(type="str"), "bad_tools",
     "tools[0].function.parameters.properties.city.type"),
    (lambda r: r["tools"][0]["function"]["parameters"].update(required=["country"]), "bad_tools",
     "tools[0].function.parameters.required"),
    (lambda r: r.update(tools=TOOLS + TOOLS), "bad_tools", "tools[1].function.name"),
])
def test_each_rule_names_the_field(mutate, code, field):
    row = json.loads(json.dumps(_row()))
    mutate(row)
    with pytest.raises(Problem) as exc:
        normalise(row)
    assert (exc.value.code, exc.value.field) == (code, field)


def test_tool_result_without_a_call_is_rejected():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}], "tools": TOOLS}
    with pytest.raises(Problem) as exc:
        normalise(row)
    assert exc.value.code == "tool_order" and "no tool call before it" in exc.value.message


def test_validate_reports_file_line_field_and_fix(tmp_path):
    good = _row()
    bad_name = json.loads(json.dumps(good))
    bad_name["messages"][1]["tool_calls"][0]["function"]["name"] = "get_time"
    bad_id = json.loads(json.dumps(good))
    bad_id["messages"][2]["tool_call_id"] = "nope"
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, bad_name, bad_id)) + "\n")
    rep = validate(path, DataConfig())
    assert rep.exit_code == 1 and rep.usable == 1
    assert rep.problems[0].startswith(f"{path}:2 [messages[1].tool_calls[0].function.name]: ")
    assert "do not declare (declared: get_weather); fix: add the tool" in rep.problems[0]
    assert rep.problems[1].startswith(f"{path}:3 [messages[2].tool_call_id]: ")
    assert any("dropped keywords Ollama does not keep" in h for h in rep.hints)


def test_sharegpt_function_call_and_observation():
    row = {"conversations": [
        {"from": "human", "value": "Weather in Paris and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                       {"name": "get_weather", "arguments": {"city": "Rome"}}])},
        {"from": "observation", "value": "18"}, {"from": "observation", "value": "21"},
        {"from": "gpt", "value": "Paris 18, Rome 21."}],
        "tools": json.dumps([{"name": "get_weather", "description": "w", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}])}
    rec = normalise(row)
    assert [m["role"] for m in rec.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["function"]["arguments"] for c in rec.messages[1]["tool_calls"]] == [{"city": "Paris"}, {"city": "Rome"}]
    assert rec.tools[0]["function"]["name"] == "get_weather"
    assert rec.tool_notes.converted == {"tools given as a JSON string": 1, "bare function object wrapped": 1}


def test_values_ollama_cannot_print_like_json_dumps_are_found():
    rec = normalise(_row(calls_args={"city": "Par\x07is", "n": 1e-07, "ok": "é <&> \"q\"\n\t"}))
    diffs = ollama_differences(rec.tools, rec.messages)
    assert len(diffs) == 2
    assert "arguments.city" in diffs[0] and "%q" in diffs[0]
    assert "arguments.n" in diffs[1] and "1e-07" in diffs[1] and "1e-7" in diffs[1]


@pytest.fixture(scope="module")
def qwen_tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir, "qwen2.5")  # the real Qwen2.5 template on the SmolLM2 tokenizer


def test_loss_on_call_turns_not_on_tool_results(qwen_tok):
    rec = normalise(_row())
    enc = encode_example(qwen_tok, rec.to_row("chat"))
    full = qwen_tok.apply_chat_template(rec.messages, tools=rec.tools, tokenize=False)
    assert enc.input_ids == qwen_tok(full, add_special_tokens=False)["input_ids"]
    assert "# Tools" in full and '<tools>\n{"type": "function", "function": {"name": "get_weather"' in full
    segs, cur = [], []
    for i, m in zip(enc.input_ids, enc.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            segs.append(qwen_tok.decode(cur))
            cur = []
    if cur:
        segs.append(qwen_tok.decode(cur))
    assert segs == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": 2, "unit": "c", "z": {"a": [1, 2.5], "b": 1}}}'
        "\n</tool_call><|im_end|>",
        "It is 18 degrees.<|im_end|>",
    ]


def test_prepare_records_the_canonical_form_in_the_data_card(tmp_path, tokenizer_dir):
    rows = [_row(), _row(calls_args={"city": "Oslo\x01"})]
    for i in range(6):  # plain chat records in the same dataset
        rows.append({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    card = prepare(src, tmp_path / "out", DataConfig(chat_template="qwen2.5", valid_ratio=0, test_ratio=0), tokenizer_dir)
    t = card["tools"]
    assert t["records_with_tools"] == 2 and t["tool_calls"] == 2 and t["family"] == "qwen2.5"
    assert t["family_tool_syntax"] == "hermes"
    assert t["dropped_schema_keywords"] == {"additionalProperties": 2, "default": 2, "minLength": 2}
    assert t["not_reproducible_in_ollama"] == 1 and "in.jsonl:2" in t["not_reproducible_examples"][0]
    assert "property names sorted" in t["canonical_form"]
    written = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    with_tools = [r for r in written if "tools" in r]
    assert len(with_tools) == 2 and all(r["tools"] == normalise(_row()).tools for r in with_tools)


def test_cli_prepare_reports_tools_and_warns(tmp_path, tokenizer_dir):
    from click.testing import CliRunner

    from edgetune.cli import cli

    src = tmp_path / "in.jsonl"
    rows = [_row(), _row(calls_args={"city": "Oslo\x01"})] + [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = CliRunner().invoke(cli, ["data", "prepare", str(src), "-o", str(tmp_path / "o"), "--model", str(tokenizer_dir),
                                   "--chat-template", "qwen2.5"])
    assert res.exit_code == 0, res.output
    assert "tools: 2 records declare tools, 2 calls" in res.output
    assert "warning: tool schemas: dropped keywords Ollama does not keep" in res.output
    assert "1 tool values print differently in Ollama" in res.output
    # the demo model's own template (ChatML, no tool syntax) is reported as dropping tools
    res = CliRunner().invoke(cli, ["data", "validate", str(src), "--model", str(tokenizer_dir)])
    assert "family chatml) has no tool-call syntax: tools are not rendered" in res.output


@pytest.mark.parametrize("template", ["qwen2.5", "qwen3", "llama3.2", "mistral-v0.3"])
def test_every_assistant_turn_is_located_in_tool_templates(tokenizer_dir, template):
    """Templates that place text by position (Mistral v0.3: tools and system by the last user turn;
    Qwen3: <think> on the last answer) still get one scored span per assistant turn, calls included."""
    from pathlib import Path

    from edgetune.errors import EdgetuneError
    from edgetune.ollama.check import _tool_conversations

    tok = load_tokenizer(tokenizer_dir, str(Path(__file__).parent / "templates" / f"{template}.jinja"))
    for name, msgs, tools in _tool_conversations(parallel=True):
        if msgs[-1]["role"] != "assistant":
            continue
        try:
            enc = encode_example(tok, {"messages": msgs, "tools": tools})
        except EdgetuneError as exc:  # Llama 3.x: "This model only supports single tool-calls at once!"
            assert template == "llama3.2" and "parallel" in name and "single tool-calls" in str(exc)
            continue
        segs, cur = [], []
        for i, m in zip(enc.input_ids, enc.loss_mask, strict=True):
            if m:
                cur.append(i)
            elif cur:
                segs.append(tok.decode(cur))
                cur = []
        segs.append(tok.decode(cur)) if cur else None
        turns = [m for m in msgs if m["role"] == "assistant"]
        assert len(segs) == len(turns), (name, segs)
        for seg, turn in zip(segs, turns, strict=True):
            for call in turn.get("tool_calls") or []:
                assert f'"name": "{call["function"]["name"]}"' in seg
            assert turn["content"] in seg
            assert '"sky"' not in seg and "1.55\n" not in seg  # tool results are never scored


def test_template_refusals_are_reported_with_the_templates_reason(tmp_path, tokenizer_dir):
    """Mistral v0.3 needs 9-character call ids: the reject says so (and names the line)."""
    from pathlib import Path

    row = _row()
    row["messages"][1]["tool_calls"][0]["id"] = row["messages"][2]["tool_call_id"] = "c1"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(_row()) + "\n" + json.dumps(row) + "\n")
    tpl = str(Path(__file__).parent / "templates" / "mistral-v0.3.jinja")
    rep = validate(src, DataConfig(chat_template=tpl), tokenizer_dir)
    assert rep.usable == 1
    assert rep.problems == [f"{src}:2: the chat template cannot render this record: "
                            "Tool call IDs should be alphanumeric strings with length 9!"]


def test_openai_legacy_function_call_and_function_role():
    row = {"messages": [{"role": "user", "content": "w?"},
                        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
                        {"role": "function", "name": "get_weather", "content": "21"},
                        {"role": "assistant", "content": "21 degrees."}], "tools": TOOLS}
    rec = normalise(row)
    assert rec.messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]
    assert rec.messages[2] == {"role": "tool", "content": "21", "name": "get_weather"}
