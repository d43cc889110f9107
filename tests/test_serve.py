"""The real OpenAI-compatible server over the demo GGUF, on a free loopback port, and the terminal chat."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from edgetune.errors import EdgetuneError
from edgetune.serve import chat_loop, is_loopback, load_llm, make_server

KEY = "sk-edgetune-test"


@pytest.fixture(scope="module")
def server(demo_gguf_path):
    srv = make_server(demo_gguf_path, port=None, api_key=KEY, n_ctx=1024, n_threads=2, alias="smol")
    with srv:
        yield srv
    assert not srv.thread.is_alive()  # stopped cleanly


@pytest.mark.slow
def test_bound_to_loopback_by_default(server):
    assert server.host == "127.0.0.1" and is_loopback(server.host)
    assert not is_loopback("0.0.0.0")


@pytest.mark.slow
def test_models_and_non_streamed_chat(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["smol"]
    resp = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0
    )
    text = resp.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    # 37 prompt tokens = the GGUF's own template, with SmolLM2's default system prompt (the same
    # count the Modelfile check reports for this chat)
    assert resp.usage.prompt_tokens == 37 and 0 < resp.usage.completion_tokens <= 16


@pytest.mark.slow
def test_streamed_chat_matches_greedy_answer(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key=KEY)
    msgs = [{"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model="smol", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="smol", messages=msgs, max_tokens=12, temperature=0, stream=True))
    assert len(chunks) > 2
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content  # greedy: same tokens either way


@pytest.mark.slow
def test_plain_completion_over_http(server):
    body = json.dumps({"prompt": "The sky is", "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(server.base_url + "/completions", data=body,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        data = json.loads(resp.read())
    assert data["choices"][0]["text"]


@pytest.mark.slow
@pytest.mark.parametrize("headers", [{"Authorization": "Bearer wrong-key"}, {}])
def test_wrong_or_missing_api_key_is_401(server, headers):
    req = urllib.request.Request(server.base_url + "/models", headers=headers)
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=30)
    assert ei.value.code == 401


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(EdgetuneError, match="GGUF file not found"):
        make_server(tmp_path / "nope.gguf")


@pytest.mark.slow
def test_terminal_chat_commands_and_history(demo_gguf_path):
    llm = load_llm(demo_gguf_path, n_ctx=1024, n_threads=2)
    inputs = iter(["Hi!", "/system You are a pirate.", "Who are you?", "/reset", "Hello again", "/exit", "never read"])
    out: list[str] = []
    history = chat_loop(llm, read=lambda _p: next(inputs), write=out.append, max_tokens=8, temperature=0)
    text = "".join(out)
    assert "(system prompt set)" in text and "(chat forgotten)" in text
    # /reset dropped the first two turns; /exit stopped before "never read"
    assert [m["content"] for m in history if m["role"] == "user"] == ["Hello again"]
    assert history[-1]["role"] == "assistant" and history[-1]["content"]
    assert next(inputs) == "never read"


@pytest.mark.slow
def test_chat_with_adapter_changes_answers(tmp_path, demo_gguf_path, make_lora_gguf, greedy_chat):
    adapter = make_lora_gguf(tmp_path / "lora.gguf")
    q = "What is the capital of France?"
    plain = greedy_chat(load_llm(demo_gguf_path, n_ctx=512, n_threads=2), q)
    adapted = greedy_chat(load_llm(demo_gguf_path, adapter=adapter, n_ctx=512, n_threads=2), q)
    assert plain and adapted and plain != adapted
