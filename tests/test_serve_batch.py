"""Continuous batching on the team server, over HTTP with the official openai client: concurrent
requests on several adapters decode together and answer exactly what the one-at-a-time server
answers; tools, JSON schemas and /v1/completions behave as on `edgetune serve MODEL.gguf`; prefixes
are reused; bad requests get a 400 and leave the batch alone."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from edgetune.serve.team_config import from_dict

KEY = "sk-batch-test"
TEMPLATE = Path(__file__).resolve().parents[1] / "edgetune" / "resources" / "demo" / "smollm2-tools.jinja"
UNIT_TOOL = {"type": "function", "function": {"name": "set_unit", "description": "Choose the temperature unit.",
                                              "parameters": {"type": "object", "required": ["unit"], "additionalProperties": False,
                                                             "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string", "maxLength": 12}}}}}
SCHEMA = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
          "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}}}
PROMPTS = ["What is the capital of France?", "Name a colour.", "Write one word about the sea.", "Count to three."]
SCALE = 0.1  # the random adapters at full strength flatten the tiny model's logits into ties everywhere
SYSTEM = "You are a careful assistant for the support team. " * 6


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir, build_tiny_model, make_lora_gguf):
    """A tiny llama with peaked logits (greedy answers far from ties) and the shipped tools template,
    as an f32 GGUF, plus two real LoRA adapters that change its answers."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.export.gguf import convert

    d = tmp_path_factory.mktemp("batch")
    m = build_tiny_model(d / "hf", tokenizer_dir, "llama", initializer_range=0.6)
    AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32).save_pretrained(str(m))
    (m / "chat_template.jinja").write_text(TEMPLATE.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = json.loads((m / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    base = convert(m, d / "base.gguf", "f32", verify=False, show_progress=False)
    ads = {f"a{i}": make_lora_gguf(d / f"a{i}.gguf", layers=2, seed=i + 1, hidden=64) for i in range(2)}
    return d, base, ads


def _team(files, parallel: int, n_ctx: int = 1024, prefix_cache: bool = True, flash_attn: bool | str = False):
    from edgetune.serve.team import make_team_server

    d, base, ads = files
    raw = {"bases": {"tiny": {"path": str(base), "n_ctx": n_ctx, "parallel": parallel, "prefix_cache": prefix_cache,
                              "flash_attn": flash_attn,
                              "adapters": {k: {"path": str(v), "scale": SCALE} for k, v in ads.items()}}},
           "limits": {"queue_depth": 16, "queue_timeout": 120}}
    return make_team_server(from_dict(raw, d), port=None, api_key=KEY, n_threads=2)


@pytest.fixture(scope="module")
def batched(files):
    with _team(files, parallel=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def serial(files):
    with _team(files, parallel=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def single(files):
    from edgetune.serve import make_server

    with make_server(files[1], port=None, n_ctx=1024, n_threads=2, alias="tiny", api_key=KEY) as srv:
        yield srv


def _client(srv):
    from openai import OpenAI

    return OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=120)


def _stats(srv) -> dict:
    import urllib.request

    req = urllib.request.Request(f"http://{srv.host}:{srv.port}/health", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["bases"]["tiny"]


def _answer(srv, model: str, prompt: str, max_tokens: int = 24, **kw) -> str:
    msgs = [{"role": "user", "content": prompt}]
    r = _client(srv).chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].message.content


def _common(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _close(got: str, want: str) -> bool:
    """The threshold of every batched-vs-one-at-a-time comparison here: the same answer for at least
    half its length (see the next test's docstring for why not to the last character)."""
    return _common(got, want) >= len(want) // 2


def test_concurrent_requests_on_three_models_decode_together_each_on_its_own_adapter(batched, serial):
    """Batched decoding and a KV cache shared by many sequences sum the same numbers in another order
    than the one-request context does, so where two tokens are nearly tied (this random model with
    random adapters has many) a greedy answer may go another way late in the answer. Stated
    thresholds: every answer agrees with its own model's one-at-a-time answer for at least half its
    length and more than with any other model's (no answer came from another adapter), and at least
    2 in 3 are identical to the last character."""
    jobs = [(m, p) for m in ("tiny", "a0", "a1") for p in PROMPTS]  # 12 requests, 3 adapter groups
    want = {j: _answer(serial, *j) for j in jobs}
    assert len({want[("tiny", p)] for p in PROMPTS} | {want[("a0", p)] for p in PROMPTS}) == 2 * len(PROMPTS)  # adapters matter
    _answer(batched, "tiny", "Hi", max_tokens=1)  # loaded
    before = _stats(batched)["batch"]
    got, errors = {}, []

    def run(job):
        try:
            got[job] = _answer(batched, *job)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for (m, p), text in got.items():
        own = _common(text, want[(m, p)])
        assert _close(text, want[(m, p)]), (m, p, text, want[(m, p)])
        assert all(own > _common(text, want[(o, p)]) for o in ("tiny", "a0", "a1") if o != m), (m, p)
    same = sum(got[j] == want[j] for j in jobs)
    assert same >= 2 * len(jobs) // 3, f"{same}/{len(jobs)} identical"
    after = _stats(batched)["batch"]
    steps = after["steps"] - before["steps"]
    tokens = after["batched_tokens"] - before["batched_tokens"]
    assert tokens / steps > 1.5, (tokens, steps)  # sequences really shared decode steps
    assert after["switches"] > before["switches"]  # and the groups took turns


def test_a_shared_system_prompt_is_computed_once(batched, serial):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[0]}]
    want = _client(serial).chat.completions.create(model="a0", messages=msgs, max_tokens=12, temperature=0)
    before = _stats(batched)["batch"]["reused_tokens"]
    first = _client(batched).chat.completions.create(model="a0", messages=msgs, max_tokens=12, temperature=0)
    second = _client(batched).chat.completions.create(model="a0", messages=msgs[:1] + [{"role": "user", "content": PROMPTS[1]}],
                                                      max_tokens=12, temperature=0)
    reused = _stats(batched)["batch"]["reused_tokens"] - before
    assert _close(first.choices[0].message.content, want.choices[0].message.content)
    assert reused >= 60, reused  # the system prompt's tokens came from the first request's cells
    assert second.usage.prompt_tokens > 60
    # a different adapter never reuses another adapter's keys and values
    before = _stats(batched)["batch"]["reused_tokens"]
    other = _client(batched).chat.completions.create(model="a1", messages=msgs, max_tokens=12, temperature=0)
    assert _stats(batched)["batch"]["reused_tokens"] - before < 10  # at most the template's opening from an earlier a1 request
    assert _close(other.choices[0].message.content, _client(serial).chat.completions.create(
        model="a1", messages=msgs, max_tokens=12, temperature=0).choices[0].message.content)


def test_prefix_cache_off_reuses_nothing(files, serial):
    jobs = [(m, p) for p in PROMPTS[:2] for m in ("a0", "tiny", "a0")]
    with _team(files, parallel=4, prefix_cache=False) as srv:
        got = [_answer(srv, *j) for j in jobs]
        assert _stats(srv)["batch"]["reused_tokens"] == 0
    assert all(_close(g, _answer(serial, *j)) for g, j in zip(got, jobs, strict=True))


def test_flash_attention_switch_reaches_both_contexts_and_answers_stay_close(files):
    """``flash_attn: true`` turns llama.cpp's flash attention on for the base's Llama and for the batch
    engine's context (it copies the Llama's settings). Its kernel rounds the queries to f16, so on this
    random model with many near-ties some answers part early from the default path's: batched answers
    are compared with a flash-attention server's one-at-a-time answers, with the stated threshold."""
    import llama_cpp

    from edgetune.errors import EdgetuneError
    from edgetune.serve.engine import LoadedBase

    d, base, _ = files
    with pytest.raises(EdgetuneError, match=r"flash_attn: expected true, false or auto, got 'yes'"):
        from_dict({"bases": {"tiny": {"path": str(base), "flash_attn": "yes"}}}, d)
    from click.testing import CliRunner

    from edgetune.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(base), "--flash-attn"])  # the single-model server has no such switch
    assert isinstance(r.exception, EdgetuneError) and "--parallel 1 --flash-attn" in r.exception.fix, r.output
    on, off = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    for parallel, flag, want in ((2, True, on), (2, False, off), (2, "auto", on), (1, "auto", off), (1, True, on)):
        lb = LoadedBase(from_dict({"bases": {"tiny": {"path": str(base), "n_ctx": 256, "parallel": parallel,
                                                      "flash_attn": flag}}}, d).bases["tiny"], 1)
        lb.load()
        try:
            assert lb.llm.context_params.flash_attn_type == want, (parallel, flag)
            if parallel > 1:
                assert lb.engine.ctx.params.flash_attn_type == want
        finally:
            lb.unload()
    jobs = [(m, p) for p in PROMPTS[:2] for m in ("a0", "tiny")]
    with _team(files, parallel=4, flash_attn=True) as srv:
        got = [_answer(srv, *j) for j in jobs]
    with _team(files, parallel=1, flash_attn=True) as srv:  # flash attention one at a time: the same attention kernel
        want = [_answer(srv, *j) for j in jobs]
    assert all(_close(g, w) for g, w in zip(got, want, strict=True)), (got, want)


def _same_requests(srv):
    """The tool / schema / completion requests a client sends; their answers, for comparison."""
    c = _client(srv)
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    named = c.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, UNIT_TOOL],
                                      tool_choice={"type": "function", "function": {"name": "set_unit"}},
                                      max_tokens=48, temperature=0).choices[0]
    required = c.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], tool_choice="required",
                                         max_tokens=40, temperature=0).choices[0]
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, UNIT_TOOL], max_tokens=48,
                                            tool_choice={"type": "function", "function": {"name": "set_unit"}},
                                            temperature=0, stream=True))
    streamed = [tc.function.arguments for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    schema = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0,
                                       response_format={"type": "json_object", "schema": SCHEMA}).choices[0]
    text = c.completions.create(model="tiny", prompt="The sea is", max_tokens=10, temperature=0).choices[0]
    return {
        "named": (named.finish_reason, [(t.function.name, json.loads(t.function.arguments)) for t in named.message.tool_calls]),
        "required": (required.finish_reason, [(t.function.name, t.function.arguments) for t in required.message.tool_calls or []],
                     required.message.content),
        "streamed": [json.loads(a) for a in streamed],
        "schema": (schema.finish_reason, schema.message.content),
        "text": (text.finish_reason, text.text),
    }


def test_tools_schemas_and_completions_answer_as_the_single_model_server(batched, single):
    team, one = _same_requests(batched), _same_requests(single)
    assert team == one
    assert team["named"][0] == "tool_calls" and team["named"][1][0][1]["unit"] in ("celsius", "fahrenheit")
    assert team["streamed"] == [team["named"][1][0][1]]
    parsed = json.loads(team["schema"][1])  # the grammar held the answer to the schema
    assert set(parsed) == {"ok", "n"} and isinstance(parsed["ok"], bool) and parsed["n"] in (1, 2, 3)
    assert team["text"][1]


def test_openai_json_schema_format_is_accepted(batched):
    r = _client(batched).chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "Status?"}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "status", "schema": SCHEMA}})
    parsed = json.loads(r.choices[0].message.content)
    assert set(parsed) == {"ok", "n"}


def test_bad_requests_are_400_and_the_batch_goes_on(batched, serial):
    import openai

    c = _client(batched)
    want = _answer(serial, "a0", PROMPTS[2], max_tokens=200)
    result = {}
    t = threading.Thread(target=lambda: result.update(a=_answer(batched, "a0", PROMPTS[2], max_tokens=200)))
    t.start()
    with pytest.raises(openai.BadRequestError, match="context is 1024"):
        c.chat.completions.create(model="a1", messages=[{"role": "user", "content": "word " * 1500}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="schema"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                  response_format={"type": "json_object", "schema": {"$ref": "#/definitions/missing"}})
    with pytest.raises(openai.BadRequestError, match="json_schema.schema"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                  response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(openai.BadRequestError, match="tools"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    t.join(120)
    assert _close(result["a"], want)  # the request decoding alongside was not disturbed


def test_unload_with_requests_in_flight_answers_them(files):
    """A base unloaded (memory cap, shutdown) fails its running requests with a message, never hangs."""
    import asyncio

    from edgetune.serve.engine import Pool

    d, base, ads = files
    cfg = from_dict({"bases": {"tiny": {"path": str(base), "n_ctx": 512, "parallel": 2}}}, d)
    pool = Pool(cfg, 2)

    async def scenario():
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "temperature": 0}
        task = asyncio.create_task(pool.submit("tiny", body))
        b = pool.bases["tiny"]
        while b.engine is None or not b.engine.active:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(b.unload)
        with pytest.raises(RuntimeError, match="unloading"):
            await task

    asyncio.run(scenario())
