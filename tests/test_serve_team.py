"""The team server over HTTP with the official openai client: a tiny real base GGUF and three real
GGUF LoRA adapters on it (each changes greedy answers), A/B and shadow routes, queue limits."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection

import pytest

from edgetune.errors import EdgetuneError
from edgetune.serve.team_config import from_dict, from_flags, load_team_config

KEY = "sk-team-test"
ADAPTERS = ["a0", "a1", "a2"]
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir, build_tiny_model, make_lora_gguf):
    """Base GGUF (peaked logits, so greedy answers are stable) + 3 adapters with different seeds."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.export.gguf import convert

    d = tmp_path_factory.mktemp("team")
    m = build_tiny_model(d / "hf", tokenizer_dir, "llama", initializer_range=0.3)
    AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32).save_pretrained(str(m))
    base = convert(m, d / "base.gguf", "f16", verify=False, show_progress=False)
    ads = {name: make_lora_gguf(d / f"{name}.gguf", layers=2, seed=i + 1, hidden=64) for i, name in enumerate(ADAPTERS)}
    return d, base, ads


def direct(base, lora, messages, max_tokens):
    """The adapter's own llama.cpp greedy answer (one Llama per adapter, lora_path at load)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(base), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=2,
                chat_format="chat_template.default", verbose=False)
    try:
        r = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0)
        return r["choices"][0]["message"]["content"]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def config(files):
    d, base, ads = files
    raw = {"bases": {"tiny": {"path": str(base), "n_ctx": 4096, "parallel": 2, "adapters": {k: str(v) for k, v in ads.items()}}},
           "routes": {"ab": {"split": {"a0": 1, "a1": 1}}, "sh": {"primary": "a0", "shadow": "a1"}},
           "limits": {"queue_depth": 1, "queue_timeout": 60},
           "log": {"shadow_log": "traffic.jsonl"}}
    return from_dict(raw, d)


@pytest.fixture(scope="module")
def server(config):
    from edgetune.serve.team import make_team_server

    srv = make_team_server(config, port=None, api_key=KEY, n_threads=2)
    with srv:
        yield srv
    assert not srv.thread.is_alive()


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


def root(server) -> str:
    return f"http://{server.host}:{server.port}"


class Resp:
    def __init__(self, status, headers, body: bytes):
        self.status_code, self.headers, self.text = status, headers, body.decode()

    def json(self):
        return json.loads(self.text)


def http(method, url, *, json_body=None, headers=None, timeout=120) -> Resp:
    """One plain HTTP request (urllib), any status returned rather than raised."""
    data = json.dumps(json_body).encode() if json_body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Resp(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.headers, e.read())


def test_each_model_id_answers_with_its_own_adapter(server, files):
    _, base, ads = files
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny", *ADAPTERS, "ab", "sh"]
    want = {"tiny": direct(base, None, Q, 6), **{k: direct(base, v, Q, 6) for k, v in ads.items()}}
    assert len(set(want.values())) == 4, want  # every adapter really changes the answer
    for mid in ["a0", "a1", "a0", "tiny", "a2", "a2", "a1"]:  # interleaved: the adapter is switched per request
        r = c.chat.completions.create(model=mid, messages=Q, max_tokens=6, temperature=0)
        assert r.model == mid and r.choices[0].message.content == want[mid], mid
        assert r.usage.prompt_tokens == 37 and 0 < r.usage.completion_tokens <= 6
    chunks = list(c.chat.completions.create(model="a2", messages=Q, max_tokens=6, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want["a2"]
    assert c.chat.completions.create(model="a1", messages=Q, max_tokens=6, temperature=0).choices[0].message.content == want["a1"]


def test_unknown_model_is_404(server):
    import openai

    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=Q, max_tokens=1)


def test_split_is_sticky_per_user(server, config):
    c = client(server)
    seen = {}
    for i in range(10):
        for _ in range(2):
            r = c.chat.completions.create(model="ab", messages=Q, max_tokens=1, temperature=0, user=f"user-{i}")
            assert seen.setdefault(i, r.model) == r.model  # same user → same side
    assert set(seen.values()) == {"a0", "a1"}  # both sides get traffic
    recs = [json.loads(x) for x in config.shadow_log.read_text().splitlines()]
    split = [r for r in recs if r["kind"] == "split"]
    assert len(split) >= 20 and all(r["route"] == "ab" and r["model"] in ("a0", "a1") and "text" not in r for r in split)


def test_shadow_log_becomes_an_eval_report(server, config, files, tmp_path):
    from click.testing import CliRunner

    from edgetune.cli import cli

    c = client(server)
    prompts = ["Name a colour.", "Say hi.", "Count to three."]
    answers = [c.chat.completions.create(model="sh", messages=[{"role": "user", "content": p}], max_tokens=5, temperature=0,
                                         metadata={"reference": "blue"}) for p in prompts]
    assert all(a.model == "a0" for a in answers)  # the primary answers
    deadline = time.time() + 120
    while time.time() < deadline:
        recs = [json.loads(x) for x in config.shadow_log.read_text().splitlines()]
        shadow = [r for r in recs if r["kind"] == "shadow"]
        if len(shadow) == 3:
            break
        time.sleep(0.2)
    assert len(shadow) == 3
    for rec, a in zip(shadow, answers, strict=True):
        assert rec["route"] == "sh" and rec["primary"]["model"] == "a0" and rec["candidate"]["model"] == "a1"
        assert rec["primary"]["text"] == a.choices[0].message.content and rec["reference"] == "blue"
        assert rec["candidate"]["completion_tokens"] > 0 and rec["candidate"]["latency_ms"] > 0
        assert "messages" not in rec  # no request text unless log_text
    text = config.shadow_log.read_text()
    assert not any(p in text for p in prompts)
    only = tmp_path / "shadow.jsonl"
    only.write_text("".join(json.dumps(r) + "\n" for r in shadow))
    res = CliRunner().invoke(cli, ["eval", "shadow", str(only), "-o", str(tmp_path / "rep"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep" / "shadow_report.json").read_text())
    agree = sum(r["primary"]["text"].strip().lower() == r["candidate"]["text"].strip().lower() for r in shadow) / 3
    assert rep["compared"] == 3 and rep["agreement"]["exact_match"] == pytest.approx(agree)
    assert rep["task"]["with_reference"] == 3 and "exact_match" in rep["task"]["primary"]
    assert "Shadow comparison: a1 vs a0" in (tmp_path / "rep" / "shadow_report.md").read_text()
    from edgetune.eval.shadow import compare_shadow

    with pytest.raises(EdgetuneError, match="needs the prompts"):
        compare_shadow(only, judge="openai:x@http://127.0.0.1:9/v1")
    # with log_text on, the prompt is logged and a judge can run (both orders) on the pair
    config.log_text = True
    try:
        c.chat.completions.create(model="sh", messages=[{"role": "user", "content": "Judge me."}], max_tokens=4, temperature=0)
        assert _wait(lambda: "Judge me." in config.shadow_log.read_text(), 120)
    finally:
        config.log_text = False
    last = json.loads(config.shadow_log.read_text().splitlines()[-1])
    assert last["messages"] == [{"role": "user", "content": "Judge me."}]
    only.write_text(json.dumps(last) + "\n")
    _, base, _ = files
    rep = compare_shadow(only, judge=f"gguf:{base}")
    j = rep["judge"]["candidate"]
    assert j["wins"] + j["ties"] + j["losses"] == 1 and rep["judge"]["judge"].startswith("gguf:")


def _health(server):
    return http("GET", root(server) + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()["bases"]["tiny"]


def _wait(cond, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_overload_is_a_fast_503_and_disconnect_cancels(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    long_body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000, "temperature": 0}
    results = {}

    def waiter():
        r = http("POST", root(server) + "/v1/chat/completions", headers=auth,
                 json_body={"model": "a1", "messages": Q, "max_tokens": 2, "temperature": 0})
        results["waiter"] = r.status_code

    def metrics():
        return http("GET", root(server) + "/metrics", headers=auth).text

    # Two long requests take both places (parallel 2). They are sent on raw connections that this test
    # closes itself, so they are abandoned mid-generation however fast this CPU generates (4000 tokens
    # take about 3 s here); a client-side timeout raced the generation and could lose.
    long_ones = [HTTPConnection(server.host, server.port, timeout=60) for _ in range(2)]
    for conn in long_ones:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(long_body),
                     headers={**auth, "Content-Type": "application/json"})
    assert _wait(lambda: _health(server)["running"] == 2)
    t2 = threading.Thread(target=waiter)
    t2.start()
    assert _wait(lambda: _health(server)["waiting"] == 1)
    t0 = time.perf_counter()  # queue_depth 1 is full: refused at once
    r = http("POST", root(server) + "/v1/chat/completions", headers=auth, json_body={"model": "a2", "messages": Q, "max_tokens": 2})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "overloaded"
    assert elapsed < 0.1, elapsed
    assert _health(server)["running"] == 2  # the long ones were still generating when their clients left
    for conn in long_ones:
        conn.close()
    t2.join(60)
    assert results["waiter"] == 200  # a freed place went to the waiter
    # 499 is recorded only for a generation stopped before its end: the server noticed both disconnects
    assert _wait(lambda: 'edgetune_requests_total{model="tiny",status="499"} 2' in metrics(), timeout=20), metrics()
    assert 'edgetune_requests_total{model="a2",status="503"} 1' in metrics()


def test_metrics_are_prometheus_text(server):
    client(server).chat.completions.create(model="a0", messages=Q, max_tokens=2, temperature=0)
    text = http("GET", root(server) + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'edgetune_queue_depth{base="tiny"} 0' in text
    assert 'edgetune_request_seconds_bucket{model="a0",le="+Inf"}' in text
    assert "# TYPE edgetune_request_seconds histogram" in text
    line = next(x for x in text.splitlines() if x.startswith('edgetune_tokens_per_second{model="a0"}'))
    assert float(line.split()[-1]) > 0


@pytest.mark.parametrize("method,path", [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                                         ("POST", "/v1/chat/completions")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_api_key_guards_every_route(server, method, path, headers):
    r = http(method, root(server) + path, headers=headers, json_body={"model": "a0", "messages": Q} if method == "POST" else None)
    assert r.status_code == 401


def test_lru_unloads_the_least_recently_used_base(files):
    from edgetune.serve.engine import Pool

    d, base, ads = files
    b2 = d / "base2.gguf"
    shutil.copy(base, b2)
    size = base.stat().st_size / 2**20
    cfg = from_dict({"bases": {"one": {"path": str(base), "n_ctx": 256}, "two": {"path": str(b2), "n_ctx": 256,
                                                                                   "adapters": {"x": str(ads["a0"])}}},
                     "limits": {"memory_cap_mb": size * 1.5 + 0.5}}, d)
    pool = Pool(cfg, 2)

    async def go():
        body = {"messages": Q, "max_tokens": 1, "temperature": 0}
        await pool.submit("one", body)
        assert [b.spec.name for b in pool.loaded()] == ["one"]
        await pool.submit("x", body)  # base two (+ adapter) does not fit next to one: one goes
        assert [b.spec.name for b in pool.loaded()] == ["two"]
        await pool.submit("one", body)
        assert [b.spec.name for b in pool.loaded()] == ["one"] and pool.unloads == 2

    try:
        asyncio.run(go())
    finally:
        for b in pool.loaded():
            b.unload()


def test_config_errors_name_the_field(files, tmp_path):
    d, base, ads = files
    ok = {"bases": {"tiny": {"path": str(base), "adapters": {"a0": str(ads["a0"])}}}}
    with pytest.raises(EdgetuneError, match="'zz', which is not a base or adapter"):
        from_dict({**ok, "routes": {"r": {"split": {"a0": 1, "zz": 1}}}}, d)
    with pytest.raises(EdgetuneError, match="used twice"):
        from_dict({**ok, "routes": {"a0": {"primary": "tiny", "shadow": "a0"}}}, d)
    with pytest.raises(EdgetuneError, match="GGUF file not found"):
        from_dict({"bases": {"t": {"path": "missing.gguf"}}}, d)
    bad = tmp_path / "bad.yaml"
    bad.write_text("bases:\n  t: [unclosed\n")
    with pytest.raises(EdgetuneError) as ei:
        load_team_config(bad)
    assert "bad.yaml:" in ei.value.where
    cfg = from_flags(base, loras=(f"a0={ads['a0']}", f"a1={ads['a1']}"), splits=("ab=a0:90,a1:10",),
                     shadows=("sh=a0:a1",), queue_depth=3, queue_timeout=None)
    assert cfg.model_ids() == ["base", "a0", "a1"] and cfg.routes["ab"].split == {"a0": 90.0, "a1": 10.0}
    assert cfg.queue_depth == 3 and cfg.routes["sh"].shadow == "a1"


def test_streaming_client_that_leaves_stops_generation(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    before = http("GET", root(server) + "/metrics", headers=auth).text.count('model="a0",status="499"')
    conn = HTTPConnection(server.host, server.port, timeout=60)
    body = {"model": "a0", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=auth)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    assert _health(server)["running"] == 1
    conn.sock.close()  # leave mid-stream
    conn.close()
    assert _wait(lambda: _health(server)["running"] == 0, 30)  # far sooner than 4000 tokens
    text = http("GET", root(server) + "/metrics", headers=auth).text
    assert 'edgetune_requests_total{model="a0",status="499"} 1' in text and before == 0


def test_shadow_runs_never_take_a_clients_place_in_the_queue():
    """queue_depth 1 with a shadow run waiting: a client request still gets the one place; a
    second shadow run past the bound is dropped, not queued."""
    from types import SimpleNamespace

    from edgetune.serve.engine import LoadedBase, Overloaded, _Turn

    cfg = SimpleNamespace(queue_depth=1, queue_timeout=5.0)
    base = LoadedBase(SimpleNamespace(name="tiny", parallel=1), 1)

    async def scenario():
        order = []

        async def job(tag, background):
            async with _Turn(cfg, base, background):
                order.append(tag)
                await asyncio.sleep(0.01)

        await base.turn.acquire()  # a request is running
        shadow = asyncio.create_task(job("shadow", True))
        await asyncio.sleep(0)
        assert base.waiting_background == 1 and base.waiting == 0
        client = asyncio.create_task(job("client", False))
        await asyncio.sleep(0)
        assert base.waiting == 1  # admitted although a shadow run waits
        with pytest.raises(Overloaded, match="queue for tiny is full"):
            await job("shadow2", True)
        with pytest.raises(Overloaded, match="queue for tiny is full"):
            await job("client2", False)
        base.turn.release()
        await asyncio.gather(shadow, client)
        return order

    assert asyncio.run(scenario()) == ["shadow", "client"]
    assert base.waiting == base.waiting_background == 0
