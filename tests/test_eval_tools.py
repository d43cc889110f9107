"""Tool-call eval: the metrics by hand, tool examples loaded from chat rows, the tools reaching each
runner's prompt (hf and gguf render the same tokens), and whole `evaluate()` runs over the openai
and ollama runners against servers that speak each API's recorded streaming protocol."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgetune.config import EvalConfig
from edgetune.eval import evaluate
from edgetune.eval.data import load_examples
from edgetune.eval.runners import GenParams, make_runner
from edgetune.eval.tools import TOOL_METRICS, score_tools

TOOLS_TEMPLATE = Path(__file__).resolve().parents[1] / "edgetune" / "resources" / "demo" / "smollm2-tools.jinja"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": {
        "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "convert_units", "description": "Convert.", "parameters": {
        "type": "object", "required": ["value"], "properties": {"value": {"type": "number"}}}}},
]


def call(name, id="abcdefghi", **args):  # ids: 9 alphanumerics (Mistral's form); distinct within a turn
    return {"id": id, "type": "function", "function": {"name": name, "arguments": args}}


PARIS = call("get_weather", city="Paris", unit="celsius")


def test_call_accuracy_by_hand():
    want = [PARIS]
    same_other_order = [{"name": "get_weather", "arguments": '{"unit": "celsius", "city": "Paris"}'}]
    assert score_tools(same_other_order, None, want) == {
        "tool_call_accuracy": 1.0, "tool_name_accuracy": 1.0, "tool_args_valid": 1.0, "tool_no_call_accuracy": None}
    wrong_arg = score_tools([{"name": "get_weather", "arguments": {"city": "paris", "unit": "celsius"}}], None, want)
    assert (wrong_arg["tool_call_accuracy"], wrong_arg["tool_name_accuracy"]) == (0.0, 1.0)  # values must be equal
    wrong_tool = score_tools([{"name": "convert_units", "arguments": {"city": "Paris", "unit": "celsius"}}], None, want)
    assert (wrong_tool["tool_call_accuracy"], wrong_tool["tool_name_accuracy"]) == (0.0, 0.0)
    # numbers compare as JSON numbers: 3 == 3.0
    assert score_tools([{"name": "convert_units", "arguments": {"value": 3.0}}], None, [call("convert_units", value=3)])[
        "tool_call_accuracy"] == 1.0
    no_call = score_tools([], None, want)
    assert no_call["tool_call_accuracy"] == 0.0 and no_call["tool_args_valid"] is None


def test_parallel_calls_compare_as_a_multiset():
    want = [PARIS, call("get_weather", id="oslo00001", city="Oslo")]
    swapped = [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]
    assert score_tools(swapped, None, want)["tool_call_accuracy"] == 1.0
    assert score_tools(swapped[:1], None, want)["tool_call_accuracy"] == 0.0  # one call missing
    assert score_tools(swapped + swapped[:1], None, want)["tool_call_accuracy"] == 0.0  # one too many


def test_no_call_accuracy_and_argument_validity():
    assert score_tools([], None, None) == {"tool_call_accuracy": None, "tool_name_accuracy": None,
                                           "tool_args_valid": None, "tool_no_call_accuracy": 1.0}
    called = score_tools([{"name": "get_weather", "arguments": {"city": "Rome"}}], None, [])
    assert called["tool_no_call_accuracy"] == 0.0 and called["tool_args_valid"] == 1.0
    malformed = score_tools([], "the call is not valid JSON", None)  # a started call counts as a call
    assert malformed["tool_no_call_accuracy"] == 0.0 and malformed["tool_args_valid"] == 0.0
    bad_args = score_tools([{"name": "get_weather", "arguments": '{"city": '}], None, [PARIS])
    assert bad_args["tool_args_valid"] == 0.0 and bad_args["tool_call_accuracy"] == 0.0


def _write_rows(path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": "Weather in Paris in celsius?"},
                      {"role": "assistant", "content": "", "tool_calls": [PARIS]}], "tools": TOOLS},
        {"messages": [{"role": "user", "content": "Weather in Paris and Oslo?"},
                      {"role": "assistant", "content": "", "tool_calls": [PARIS, call("get_weather", id="oslo00001", city="Oslo")]}],
         "tools": json.dumps(TOOLS)},  # a JSON string, as some exports store it
        {"messages": [{"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": "", "tool_calls": [PARIS]},
                      {"role": "tool", "content": '{"temperature": 18}', "tool_call_id": "abcdefghi"},
                      {"role": "assistant", "content": "It is 18 °C in Paris."}], "tools": TOOLS},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}], "tools": TOOLS},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_tool_examples_load_with_their_reference_calls(tmp_path):
    ex = load_examples(_write_rows(tmp_path / "t.jsonl"))
    assert [len(e.reference_calls or []) for e in ex] == [1, 2, 0, 0]
    assert all(e.tools == TOOLS for e in ex)  # the string form parsed to the same list
    assert ex[2].messages[-1]["role"] == "tool" and ex[2].reference == "It is 18 °C in Paris."


# ------------------------------------------------------------------------------ runners' prompts
@pytest.fixture(scope="module")
def tools_model(tiny_tools_model):
    """The tiny llama with the shipped tool template, as an HF folder and an f32 GGUF."""
    return tiny_tools_model


def test_hf_and_gguf_render_the_same_tool_prompt(tools_model, tmp_path):
    hf_dir, gguf = tools_model
    ex = load_examples(_write_rows(tmp_path / "t.jsonl"))[2]  # history with a call (arguments as objects) and a result
    hf = make_runner(f"hf:{hf_dir}", dtype="float32")
    gg = make_runner(f"gguf:{gguf}", n_ctx=1024)
    try:
        p_hf, p_gg = hf.render(ex.messages, True, ex.tools), gg.render(ex.messages, True, ex.tools)
        assert p_hf == p_gg and '"name": "convert_units"' in p_hf and "<tool_response>" in p_hf
        assert hf.tokenize(p_hf) == gg.tokenize(p_gg)
        params = GenParams(max_tokens=3)
        with_tools, plain = gg.generate(ex.messages, params, tools=ex.tools), gg.generate(ex.messages, params)
        assert with_tools.prompt_tokens > plain.prompt_tokens + 100  # the schemas are in the prompt
        assert with_tools.tool_calls is not None and plain.tool_calls is None  # parsed only when tools were offered
        g = hf.generate_batch([ex.messages, ex.messages], params, tools=[ex.tools, None])
        assert g[0].prompt_tokens == with_tools.prompt_tokens and g[1].prompt_tokens == plain.prompt_tokens
    finally:
        gg.close()


# ------------------------------------------------------------------------------ openai + ollama
def _answer(body: dict) -> tuple[list[dict] | None, str]:
    """What the fake model answers: weather questions get calls, the rest text. Paris+Oslo gets a
    malformed second call (arguments that are not JSON)."""
    user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    if body["messages"][-1]["role"] == "tool" or "weather" not in user.lower():
        return None, "Hi!" if "hi" in user.lower() else "It is 18 °C in Paris."
    calls = [("get_weather", '{"city": "Paris", "unit": "celsius"}')]
    if "Oslo" in user:
        calls.append(("get_weather", '{"city": "Oslo"'))
    elif "celsius" not in user:
        calls = [("get_weather", '{"city": "Paris"}')]  # forgot the unit the reference has
    return calls, ""


class _FakeOpenAI(BaseHTTPRequestHandler):
    """OpenAI's chat.completion.chunk stream (platform docs, "Streaming" with tool calls): a call's
    id/name first, its arguments in pieces, then finish_reason tool_calls."""

    requests: list = []

    def do_GET(self):  # noqa: N802
        self._json({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "me"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        calls, text = _answer(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "fake"}

        def send(delta, finish=None):
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())

        send({"role": "assistant", "content": None if calls else ""})
        for i, (name, args) in enumerate(calls or []):
            send({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": ""}}]})
            for k in range(0, len(args), 7):
                send({"tool_calls": [{"index": i, "function": {"arguments": args[k:k + 7]}}]})
        if text:
            send({"content": text})
        send({}, "tool_calls" if calls else "stop")
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _FakeOllama(BaseHTTPRequestHandler):
    """Ollama's /api/chat stream with tools (docs/api.md, "Chat request (with tools)"): the calls
    come in one message.tool_calls with arguments as objects, then a done line."""

    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        calls, text = _answer(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        msg = {"role": "assistant", "content": text}
        if calls:  # Ollama only returns calls it could parse: a malformed one stays text
            ok = [c for c in calls if c[1].endswith("}")]
            msg["tool_calls"] = [{"function": {"name": n, "arguments": json.loads(a)}} for n, a in ok]
            msg["content"] = "".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls if (n, a) not in ok)
        for line in ({"model": "tools", "message": msg, "done": False},
                     {"model": "tools", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                      "prompt_eval_count": 300, "eval_count": 12, "eval_duration": 10_000_000}):
            self.wfile.write((json.dumps(line) + "\n").encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_servers(monkeypatch):
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (_FakeOpenAI, _FakeOllama)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{servers[1].server_address[1]}")
    yield f"http://127.0.0.1:{servers[0].server_address[1]}/v1"
    for s in servers:
        s.shutdown()


def test_evaluate_tool_metrics_over_openai_and_ollama(fake_servers, tmp_path):
    data = _write_rows(tmp_path / "t.jsonl")
    _FakeOpenAI.requests.clear()
    _FakeOllama.requests.clear()
    cfg = EvalConfig(regression=False, nll=False, max_tokens=32)
    report = evaluate(data, [f"api=openai:fake@{fake_servers}", "local=ollama:tools"], tmp_path / "out", cfg)
    assert report["headline"] == "tool_call_accuracy" and set(report["metrics"]["task"]) >= set(TOOL_METRICS)
    for m in report["models"]:
        met = m["metrics"]
        # row 1: the right call; row 2: the 2nd of two parallel calls is malformed -> 1 of 2 expected calls right
        assert met["tool_call_accuracy"] == 0.5 and met["tool_name_accuracy"] == 0.5
        assert met["tool_no_call_accuracy"] == 1.0  # the answer after the result and "Say hi." make no call
    api, local = (m["metrics"] for m in report["models"])
    assert api["tool_args_valid"] == 0.5  # the server streamed arguments that are not JSON
    assert local["tool_args_valid"] == 1.0  # Ollama left the malformed call as text: no call attempted in the API
    # what reached the servers: the tools, and history arguments as Ollama wants them (objects)
    assert all(r["tools"] == TOOLS for r in _FakeOpenAI.requests + _FakeOllama.requests)
    hist = next(r for r in _FakeOllama.requests if r["messages"][-1]["role"] == "tool")
    assert hist["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    assert (tmp_path / "out" / "report.md").is_file()
