"""From served traffic back to a better model: registry aliases (promote, rollback, a team server that
follows `registry:NAME@prod` without a restart), feedback on answers, logs turned into training rows
and pairs, and a gated canary that promotes or rolls back on its own — on real tiny GGUFs."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from edgetune import aliases, registry
from edgetune.errors import EdgetuneError
from edgetune.serve.canary import verdict
from edgetune.serve.team_config import from_dict

KEY = "sk-loop"
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tokenizer_dir, build_tiny_model):
    """Three registered versions of model 'tiny' (different weights, different greedy answers) in a
    registry of their own; v3 failed its eval gates."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.export.gguf import convert

    d = tmp_path_factory.mktemp("loop")
    home = d / "registry"
    for v, seed in ((1, 1), (2, 2), (3, 3)):
        m = build_tiny_model(d / f"hf{v}", tokenizer_dir, "llama", seed=seed, initializer_range=0.3)
        AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32).save_pretrained(str(m))
        g = convert(m, d / f"tiny-v{v}-f16.gguf", "f16", verify=False, show_progress=False)
        q = g.with_name("tiny-q8_0.gguf")
        g.rename(q)
        manifest = {"artifacts": {q.name: {"sha256": str(v), "size": q.stat().st_size}}, "ollama": {"quant": "q8_0"},
                    "eval_gates": {"passed": v != 3}}
        registry.register("tiny", manifest, {q.name: q}, f"fp{v}", root=home)
    return d, home


def _direct(gguf, max_tokens=8):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, chat_format="chat_template.default", verbose=False)
    try:
        return llm.create_chat_completion(Q, max_tokens=max_tokens, temperature=0)["choices"][0]["message"]["content"]
    finally:
        llm.close()


def _post(srv, path, body):
    req = urllib.request.Request(f"http://{srv.host}:{srv.port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _chat(srv, model, **extra):
    return _post(srv, "/v1/chat/completions", {"model": model, "messages": Q, "max_tokens": 8, "temperature": 0, **extra})


def test_promote_rollback_and_history(versions, monkeypatch):
    d, home = versions
    monkeypatch.setenv("EDGETUNE_HOME", str(home))
    aliases.promote("tiny:v1", "prod", reason="first release")
    assert aliases.resolve("tiny", "prod").version == 1
    aliases.promote("tiny:v2", "prod")
    with pytest.raises(EdgetuneError, match="failed its eval gates"):
        aliases.promote("tiny:v3", "prod")
    assert aliases.resolve("tiny", "prod").version == 2
    assert aliases.rollback("tiny", "prod").version == 1
    hist = aliases.read("tiny")["prod"]["history"]
    assert [(h["version"], h["action"]) for h in hist] == [(1, "promote"), (2, "promote"), (1, "rollback")]
    assert hist[0]["reason"] == "first release"
    aliases.promote("tiny:v3", "canary", force=True)  # forced: allowed, and on record
    assert aliases.aliases_of("tiny", 3) == ["canary"]
    with pytest.raises(EdgetuneError, match="nothing to roll back to"):
        aliases.rollback("tiny", "canary")
    from click.testing import CliRunner

    from edgetune.cli import cli

    r = CliRunner().invoke(cli, ["models", "show", "tiny@prod"])
    assert r.exit_code == 0, r.output
    assert "tiny:v1" in r.output and "alias @prod -> v1" in r.output and "rollback" in r.output
    r = CliRunner().invoke(cli, ["models", "promote", "tiny:v2", "--as", "prod"])
    assert r.exit_code == 0 and "tiny@prod -> tiny:v2" in r.output
    r = CliRunner().invoke(cli, ["models", "rollback", "tiny", "--alias", "prod"])
    assert r.exit_code == 0 and "tiny:v1" in r.output


def test_server_follows_the_alias_and_takes_feedback(versions, monkeypatch, tmp_path):
    from edgetune.serve.team import make_team_server

    d, home = versions
    monkeypatch.setenv("EDGETUNE_HOME", str(home))
    aliases.promote("tiny:v1", "prod")
    want = {v: _direct(registry.get(f"tiny:v{v}", home).path / "tiny-q8_0.gguf") for v in (1, 2)}
    assert want[1] != want[2]
    cfg = from_dict({"bases": {"tiny": {"path": "registry:tiny@prod", "n_ctx": 512, "parallel": 2}},
                     "log": {"shadow_log": "traffic.jsonl", "log_text": True, "feedback_ttl_s": 2}}, tmp_path)
    with make_team_server(cfg, port=None, api_key=KEY, n_threads=2) as srv:
        status, out, headers = _chat(srv, "tiny")
        assert status == 200 and headers["x-edgetune-version"] == "tiny:v1"
        assert out["choices"][0]["message"]["content"] == want[1]
        rid = out["id"]
        aliases.promote("tiny:v2", "prod")  # no restart
        time.sleep(1.1)
        status, out2, headers = _chat(srv, "tiny")
        assert headers["x-edgetune-version"] == "tiny:v2" and out2["choices"][0]["message"]["content"] == want[2]
        # feedback
        assert _post(srv, "/v1/feedback", {"request_id": rid, "rating": "down", "correction": "Paris.", "tags": ["wrong"]})[0] == 200
        assert _post(srv, "/v1/feedback", {"request_id": out2["id"], "rating": "up"})[0] == 200
        code, err, _ = _post(srv, "/v1/feedback", {"request_id": "chatcmpl-nope", "rating": "up"})
        assert code == 404 and "unknown" in err["error"]["message"]
        code, err, _ = _post(srv, "/v1/feedback", {"request_id": rid, "rating": "meh"})
        assert code == 400 and "rating" in err["error"]["message"]
        time.sleep(2.2)
        code, err, _ = _post(srv, "/v1/feedback", {"request_id": out2["id"], "rating": "up"})
        assert code == 404 and "expired" in err["error"]["message"]
    lines = [json.loads(x) for x in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    assert [(x["rating"], x["model"]) for x in lines] == [("down", "tiny"), ("up", "tiny")]
    assert lines[0]["correction"] == "Paris." and lines[0]["messages"] == Q and lines[0]["answer"] == want[1]
    assert lines[0]["tags"] == ["wrong"]


def test_feedback_keeps_no_text_without_log_text(versions, monkeypatch, tmp_path):
    from edgetune.serve.team import make_team_server

    d, home = versions
    monkeypatch.setenv("EDGETUNE_HOME", str(home))
    cfg = from_dict({"bases": {"tiny": {"path": "registry:tiny:v1", "n_ctx": 512}},
                     "log": {"feedback_log": "fb.jsonl"}}, tmp_path)
    with make_team_server(cfg, port=None, api_key=KEY, n_threads=2) as srv:
        rid = _chat(srv, "tiny")[1]["id"]
        assert _post(srv, "/v1/feedback", {"request_id": rid, "rating": "down", "correction": "secret text"})[0] == 200
    (rec,) = [json.loads(x) for x in (tmp_path / "fb.jsonl").read_text().splitlines()]
    assert rec["rating"] == "down" and not {"messages", "answer", "correction"} & set(rec)


def test_logs_become_rows_and_pairs(tmp_path):
    from edgetune.data.formats import normalise
    from edgetune.data.from_logs import from_logs

    q = [{"role": "user", "content": "Reset my password, I am bob@example.com"}]
    fb = [
        {"kind": "feedback", "request_id": "a", "rating": "down", "messages": q, "answer": "No.", "correction": "Open Settings."},
        {"kind": "feedback", "request_id": "b", "rating": "up", "messages": Q, "answer": "Paris."},
        {"kind": "feedback", "request_id": "b2", "rating": "up", "messages": Q, "answer": "Paris."},  # duplicate
        {"kind": "feedback", "request_id": "c", "rating": "down", "messages": Q, "answer": "Rome."},  # no correction
        {"kind": "feedback", "request_id": "d", "rating": "up", "model": "x"},  # no text (log_text off)
        {"kind": "feedback", "request_id": "e", "rating": "up", "messages": [{"role": "user", "content": "held out?"}],
         "answer": "yes"},
    ]
    shadow = [{"kind": "shadow", "request_id": "s", "messages": Q, "reference": "Paris",
               "primary": {"model": "a", "text": "Rome"}, "candidate": {"model": "b", "text": "Paris"}},
              {"kind": "shadow", "request_id": "t", "messages": q, "preferred": "primary",
               "primary": {"model": "a", "text": "Go to Settings."}, "candidate": {"model": "b", "text": "I can't."}}]
    (tmp_path / "feedback.jsonl").write_text("\n".join(json.dumps(x) for x in fb) + "\nnot json\n")
    (tmp_path / "shadow.jsonl").write_text("\n".join(json.dumps(x) for x in shadow) + "\n")
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "test.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Held  OUT?"},
                                                                      {"role": "assistant", "content": "x"}]}) + "\n")
    card = from_logs([tmp_path / "feedback.jsonl", tmp_path / "shadow.jsonl"], tmp_path / "out",
                     held_out=[run / "data" / "valid.jsonl", run / "data" / "test.jsonl"])
    assert card["by_signal"] == {"correction": 1, "correction_over_original": 1, "judge_preferred": 1,
                                 "reference_check": 1, "thumbs_up": 1}
    assert card["dropped"] == {"duplicate": 1, "feedback_without_text": 1, "overlaps_held_out": 1,
                               "thumbs_down_without_correction": 1}
    assert card["unreadable_lines"] == 1 and card["unreadable"][0].endswith("feedback.jsonl:7: Expecting value: line 1 column 1 (char 0)")
    assert card["pii_redacted"]
    sft = [json.loads(x) for x in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert "bob@example.com" not in json.dumps(sft + pairs)
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "Open Settings."}
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("Open Settings.", "No."), ("Paris", "Rome"), ("Go to Settings.", "I can't.")}
    for row in sft + pairs:  # every row is one the data stage takes
        normalise(row)


def test_the_canary_test_states_its_numbers():
    kw = dict(alpha=0.05, margin=0.05, min_outcomes=20, max_outcomes=200)
    assert verdict(10, 19, 18, 20, **kw)[0] is None  # too few on one side
    act, nums = verdict(10, 40, 32, 40, **kw)  # 0.25 vs 0.80
    assert act == "promote" and nums["lower"] > -0.05 and nums["p_candidate"] == 0.8
    act, nums = verdict(32, 40, 10, 40, **kw)
    assert act == "rollback" and nums["upper"] < 0
    assert verdict(20, 40, 19, 40, **kw)[0] is None  # too close to call yet
    assert verdict(100, 200, 95, 200, **kw)[0] == "rollback"  # inconclusive at max_outcomes: stable stays


def _rate_until_decided(srv, route: str, liked: str, limit: int = 60) -> tuple[dict, set[str]]:
    """Users on ``route`` rate answers from model id ``liked`` up and the others down, until the
    canary decides: (its last state, the model ids that answered)."""
    sides: set[str] = set()
    state: dict = {}
    for i in range(limit):
        _status, out, headers = _chat(srv, route, user=f"{route}{i}")
        sides.add(headers["x-edgetune-model"])
        rating = "up" if headers["x-edgetune-model"] == liked else "down"
        _post(srv, "/v1/feedback", {"request_id": out["id"], "rating": rating})
        req = urllib.request.Request(f"http://{srv.host}:{srv.port}/v1/canary/{route}", headers={"Authorization": f"Bearer {KEY}"})
        state = json.loads(urllib.request.urlopen(req, timeout=30).read())
        if state["status"] != "running":
            break
    return state, sides


def test_canary_promotes_a_good_candidate_and_rolls_back_a_bad_one(versions, monkeypatch, tmp_path):
    """Users (simulated) rate the candidate's answers up and the stable's down: the canary promotes,
    the prod alias moves to the candidate's version and the stable base follows it. A second canary
    whose candidate gets the downvotes is rolled back; the alias stays."""
    from edgetune.serve.team import make_team_server

    d, home = versions
    monkeypatch.setenv("EDGETUNE_HOME", str(home))
    aliases.promote("tiny:v1", "prod")
    canary = {"min_outcomes": 6, "max_outcomes": 60, "share": 50, "promote": {"model": "tiny", "alias": "prod"}}
    cfg = from_dict({"bases": {"prod": {"path": "registry:tiny@prod", "n_ctx": 512},
                               "v2": {"path": "registry:tiny:v2", "n_ctx": 512}},
                     "routes": {"release": {"canary": {"stable": "prod", "candidate": "v2", **canary}},
                                "bad": {"canary": {"stable": "prod", "candidate": "v2", **canary}}},
                     "log": {"shadow_log": "traffic.jsonl"}}, tmp_path)
    with make_team_server(cfg, port=None, api_key=KEY, n_threads=2) as srv:
        state, sides = _rate_until_decided(srv, "release", liked="v2")
        assert sides == {"prod", "v2"}
        assert state["status"] == "promoted" and state["decision"]["action"] == "promote" and state["decision"]["by"] == "test"
        assert aliases.resolve("tiny", "prod").version == 2
        time.sleep(1.1)
        assert _chat(srv, "release")[2]["x-edgetune-version"] == "tiny:v2"  # the stable base followed the alias
        # the bad canary: the candidate's answers are rated down
        state, _sides = _rate_until_decided(srv, "bad", liked="prod")
        assert state["status"] == "rolled_back" and state["decision"]["upper"] < 0
        assert all(_chat(srv, "bad", user=f"z{i}")[2]["x-edgetune-model"] == "prod" for i in range(4))
        # manual override
        code, st, _ = _post(srv, "/v1/canary/bad", {"action": "resume"})
        assert code == 200 and st["status"] == "running"
        assert _post(srv, "/v1/canary/bad", {"action": "explode"})[0] == 400
    decisions = [json.loads(x) for x in (tmp_path / "traffic.jsonl").read_text().splitlines() if '"canary_decision"' in x]
    assert [x["action"] for x in decisions] == ["promote", "rollback"]
    assert decisions[0]["alias"] == "tiny@prod -> tiny:v2" and "p_candidate" in decisions[0]
