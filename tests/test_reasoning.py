"""Reasoning ("thinking") from data to serve: the data stage, the loss mask, the Ollama TEMPLATE check,
the served reply split into reasoning_content and content, and eval's thinking on/off sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune.chat_families import FAMILY_BY_NAME
from edgetune.reasoning import NONE, StreamSplit, Thinking, probe_jinja, request_think, split

QWEN3 = FAMILY_BY_NAME["qwen3"].jinja
CHATML = FAMILY_BY_NAME["chatml"].jinja
# DeepSeek-R1 style: the generation prompt opens the block, the reply starts inside the reasoning
OPENED = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content.split('</think>')[-1] }}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
ON = Thinking(renders=True, switch=True)


# ------------------------------------------------------------------------------ splitting replies
@pytest.mark.parametrize("text,started,want", [
    ("<think>\n3 + 4 = 7.\n</think>\n\n7", False, ("3 + 4 = 7.", "7")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("7", False, (None, "7")),  # thinking off: the answer alone
    ("<think>\nstill going", False, ("still going", "")),  # ran out of tokens: all reasoning, no answer
    ("3 + 4 = 7.\n</think>\n\n7", True, ("3 + 4 = 7.", "7")),  # the prompt opened the block
    ("<think>\n\n</think>\n\n7", False, (None, "7")),  # an empty block is no reasoning
])
def test_split_separates_reasoning_from_the_answer(text, started, want):
    assert split(text, ON, started=started) == want


def test_split_leaves_text_alone_for_a_template_without_thinking():
    assert split("<think>x</think>y", NONE) == (None, "<think>x</think>y")


@pytest.mark.parametrize("text,started", [
    ("<think>\nLet me add: 3 + 4 = 7.\n</think>\n\nThe answer is 7.", False),
    ("The answer is 7.", False),
    ("<thin", False),
    ("reasoning only </thi", True),
    ("x </think> y", True),
])
def test_streamed_split_equals_the_whole_reply_split(text, started):
    for step in (1, 2, 5):
        s = StreamSplit(ON, started=started)
        why = ans = ""
        for i in range(0, len(text), step):
            r, a = s.feed(text[i:i + step])
            why, ans = why + r, ans + a
        r, a = s.flush()
        why, ans = why + r, ans + a
        want_r, want_a = split(text, ON, started=started)
        assert (why or None, ans) == (want_r, want_a), step


def test_probe_reads_what_a_template_does_with_reasoning():
    q = probe_jinja(QWEN3)
    assert q.renders and q.switch and not q.opened
    assert not probe_jinja(CHATML).any
    o = probe_jinja(OPENED)
    assert o.opened and not o.switch and not o.renders


@pytest.mark.parametrize("body,want", [
    ({}, None), ({"think": False}, False), ({"think": True}, True), ({"think": "high"}, True),
    ({"chat_template_kwargs": {"enable_thinking": False}}, False), ({"reasoning_effort": "none"}, False),
    ({"chat_template_kwargs": {"enable_thinking": True}, "think": False}, True),
])
def test_request_think_reads_every_clients_switch(body, want):
    assert request_think(body) is want


# ------------------------------------------------------------------------------ data
def _write(tmp_path: Path, rows: list) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


ROWS = [
    {"messages": [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": "7", "reasoning_content": "3 plus 4 is 7."}]},
    {"messages": [{"role": "user", "content": "What is 5+4?"}, {"role": "assistant", "content": "<think>\n5 plus 4 is 9.\n</think>\n\n9"}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "thinking": "2 and 2 make 4."}],
     "enable_thinking": False},
    {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "thinking": 5}]},
]


def test_reasoning_fields_normalise_to_reasoning_content():
    from edgetune.data.formats import normalise
    from edgetune.data.problems import Problem

    assert normalise(ROWS[0]).messages[1] == {"role": "assistant", "content": "7", "reasoning_content": "3 plus 4 is 7."}
    assert normalise(ROWS[1]).messages[1] == {"role": "assistant", "content": "9", "reasoning_content": "5 plus 4 is 9."}
    rec = normalise(ROWS[3])
    assert rec.messages[1]["reasoning_content"] == "2 and 2 make 4." and rec.thinking is False
    with pytest.raises(Problem, match=r"messages\[1\]\.thinking must be a string"):
        normalise(ROWS[4])
    with pytest.raises(Problem, match="no answer after it"):
        normalise({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>only</think>"}]})
    with pytest.raises(Problem, match="enable_thinking"):
        normalise({**ROWS[2], "enable_thinking": "yes"})


def test_prepare_sets_thinking_per_record_and_reports_it(tmp_path, tokenizer_dir):
    from edgetune.config import DataConfig
    from edgetune.data import prepare

    cfg = DataConfig(chat_template="qwen3", valid_ratio=0.0, test_ratio=0.0)
    card = prepare(_write(tmp_path, ROWS), tmp_path / "out", cfg, model_dir=tokenizer_dir)
    rows = {r["messages"][0]["content"]: r for r in map(json.loads, (tmp_path / "out" / "train.jsonl").open())}
    assert rows["What is 3+4?"]["enable_thinking"] is True
    assert rows["What is 5+4?"]["messages"][1] == {"role": "assistant", "content": "9", "reasoning_content": "5 plus 4 is 9."}
    assert rows["Capital of France?"]["enable_thinking"] is False  # no reasoning: thinking off
    assert rows["2+2?"]["enable_thinking"] is False and "reasoning_content" not in rows["2+2?"]["messages"][1]
    th = card["thinking"]
    assert (th["records_with_reasoning"], th["records_without_reasoning"]) == (2, 2)
    assert (th["thinking_on"], th["thinking_off"], th["reasoning_dropped"]) == (2, 2, 1)
    assert th["template_renders_reasoning"] and th["template_switch"]
    assert card["counts"]["rejected_by_reason"] == {"wrong_type": 1}


def test_reasoning_for_a_template_without_a_thinking_block_is_named(tmp_path, tokenizer_dir):
    from edgetune.config import DataConfig
    from edgetune.data import prepare

    src = _write(tmp_path, ROWS[:3])
    card = prepare(src, tmp_path / "out", DataConfig(valid_ratio=0.0, test_ratio=0.0), model_dir=tokenizer_dir)
    assert card["counts"]["rejected_by_reason"] == {"reasoning_unsupported": 2}
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").open()]
    assert {(r["line"], r["reason"]) for r in rejects} == {(1, "reasoning_unsupported"), (2, "reasoning_unsupported")}
    assert "data.thinking: text" in rejects[0]["detail"] and str(src) == rejects[0]["source"]
    # kept as text only when the user says so
    card = prepare(src, tmp_path / "text", DataConfig(valid_ratio=0.0, test_ratio=0.0, thinking="text"), model_dir=tokenizer_dir)
    assert card["counts"]["rejected"] == 0 and card["thinking"]["reasoning_as_text"] == 2
    answers = {r["messages"][1]["content"] for r in map(json.loads, (tmp_path / "text" / "train.jsonl").open())}
    assert "<think>\n3 plus 4 is 7.\n</think>\n\n7" in answers
    card = prepare(src, tmp_path / "off", DataConfig(valid_ratio=0.0, test_ratio=0.0, thinking="off"), model_dir=tokenizer_dir)
    assert card["counts"]["rejected"] == 0 and card["thinking"]["reasoning_dropped"] == 2


def test_yaml_on_off_read_as_thinking_choices():
    from edgetune.config import DataConfig, EvalConfig

    assert DataConfig(thinking=False).thinking == "off" and EvalConfig(thinking=True).thinking == "on"


def test_loss_covers_reasoning_and_answer_with_thinking_on_and_the_answer_alone_off(tokenizer_dir):
    from edgetune.data.template import encode_example, load_tokenizer

    tok = load_tokenizer(tokenizer_dir, "qwen3")

    def target(row):
        e = encode_example(tok, row)
        return tok.decode([i for i, m in zip(e.input_ids, e.loss_mask, strict=True) if m]), tok.decode(e.input_ids)

    on = {"messages": [{"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "7", "reasoning_content": "3 plus 4 is 7."}],
          "enable_thinking": True}
    assert target(on)[0] == "<think>\n3 plus 4 is 7.\n</think>\n\n7<|im_end|>"
    off = {"messages": [{"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "7"}], "enable_thinking": False}
    loss, text = target(off)
    assert loss == "7<|im_end|>" and "<think>\n\n</think>\n\n7" in text  # the empty block is prompt, as at inference
    # multi-turn: the earlier turn's reasoning is dropped by the template, so it is neither text nor target
    multi = {"messages": [on["messages"][0], on["messages"][1], {"role": "user", "content": "and 5+5?"},
                          {"role": "assistant", "content": "10", "reasoning_content": "5 plus 5 is 10."}], "enable_thinking": True}
    loss, text = target(multi)
    assert "3 plus 4" not in text and loss == "7<|im_end|><think>\n5 plus 5 is 10.\n</think>\n\n10<|im_end|>"


# ------------------------------------------------------------------------------ Ollama TEMPLATE
def test_ollama_check_renders_thinking_on_and_off_token_for_token(tiny_thinking_model):
    from edgetune.export.model_info import model_info
    from edgetune.ollama.check import compare
    from edgetune.ollama.template import go_template_for

    info = model_info(None, tiny_thinking_model[0])
    fam, go = go_template_for(info)
    res = compare(go, info, family=fam.name)
    names = [c.name for c in res.conversations]
    assert res.ok and fam.name == "qwen3"
    for want in ("thinking on: request", "thinking off: request", "thinking on: two turns, earlier reasoning",
                 "thinking: multi-turn training example with reasoning",
                 "thinking on: tools: call, result, answer with reasoning"):
        assert want in names
    assert all(c.status == "identical" and c.compared == "tokens" for c in res.conversations if c.name.startswith("thinking"))
    # the check can fail: a TEMPLATE that ignores Ollama's think:false misses the prefilled empty block
    broken = go.replace('{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}', "")
    assert broken != go
    bad = compare(broken, info, family=fam.name)
    failed = {c.name for c in bad.conversations if c.status == "different"}
    assert not bad.ok and "thinking off: request" in failed and "thinking on: request" not in failed


# ------------------------------------------------------------------------------ serve
def test_served_reply_puts_reasoning_in_reasoning_content(tiny_thinking_model):
    """The tiny random model is forced by a grammar to write a thinking reply; the handler splits it."""
    from llama_cpp import Llama
    from llama_cpp.llama_grammar import LlamaGrammar

    from edgetune.toolcalls import chat_handler

    llm = Llama(model_path=str(tiny_thinking_model[1]), n_ctx=512, n_threads=1, verbose=False)
    g = LlamaGrammar.from_string('root ::= "<think>\\n3 + 4 = 7.\\n</think>\\n\\n7"', verbose=False)
    msgs = [{"role": "user", "content": "3+4?"}]
    r = chat_handler(llama=llm, messages=msgs, grammar=g, max_tokens=40, temperature=0)
    msg = r["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("3 + 4 = 7.", "7")
    chunks = list(chat_handler(llama=llm, messages=msgs, grammar=g, max_tokens=40, temperature=0, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "3 + 4 = 7."
    assert "".join(d.get("content", "") for d in deltas) == "7"


def test_server_honours_a_requests_thinking_switch(tiny_thinking_model):
    from openai import OpenAI

    from edgetune.serve import make_server

    with make_server(tiny_thinking_model[1], port=None, n_ctx=512, n_threads=1, alias="tiny") as srv:
        client = OpenAI(base_url=srv.base_url, api_key="none")
        kw = dict(model="tiny", messages=[{"role": "user", "content": "3+4?"}], max_tokens=1, temperature=0)
        default = client.chat.completions.create(**kw).usage.prompt_tokens
        off = client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).usage.prompt_tokens
        ollama_off = client.chat.completions.create(**kw, extra_body={"think": False}).usage.prompt_tokens
        on = client.chat.completions.create(**kw, extra_body={"think": True}).usage.prompt_tokens
    # thinking off prefills the empty <think>\n\n</think>\n\n block: a few more prompt tokens
    assert off == ollama_off > default == on


# ------------------------------------------------------------------------------ eval
def test_eval_scores_the_answer_with_thinking_on_and_off(tiny_thinking_model, tmp_path):
    from edgetune.config import EvalConfig
    from edgetune.eval import evaluate

    data = _write(tmp_path, [ROWS[0], ROWS[2]])
    cfg = EvalConfig(max_tokens=4, regression=False, nll=False, metrics=["exact_match"])
    rep = evaluate(data, [f"t=gguf:{tiny_thinking_model[1]}", f"h=hf:{tiny_thinking_model[0]}"], tmp_path / "e", cfg)
    assert rep["thinking"] == {"task": True, "think_off": False}
    for m in rep["models"]:
        assert {"exact_match", "reasoning_rate", "reasoning_chars", "think_off.exact_match", "think_off.reasoning_rate"} <= set(m["metrics"])
        assert m["metrics"]["think_off.reasoning_rate"] == 0.0
    assert "think_off" in rep["examples"]
    # a template without a switch: one task set, no reasoning metrics
    rep = evaluate(data, [f"h=hf:{tiny_thinking_model[0]}"], tmp_path / "e2", EvalConfig(**{**cfg.__dict__, "chat_template": "chatml"}))
    assert rep["thinking"] == {"task": None} and "reasoning_rate" not in rep["models"][0]["metrics"]


# ------------------------------------------------------------------------------ the shipped recipe
def test_reasoning_demo_recipe_runs_end_to_end(tiny_llama_dir, tmp_path, monkeypatch):
    """The shipped reasoning-demo recipe shrunk to the tiny model: the data is rendered with Qwen3's
    thinking template, the fused model and its GGUF carry it, the Modelfile is checked with thinking on
    and off, and eval reports the answer with thinking on and off."""
    from click.testing import CliRunner

    from edgetune.cli import cli
    from edgetune.io import read_json
    from edgetune.recipes import demo_resource
    from edgetune.runfolder import RunFolder

    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path / "home"))
    lines = demo_resource("demo:reasoning_sums.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:40]
    (tmp_path / "sums.jsonl").write_text("".join(lines), encoding="utf-8")
    sets = [f"model={tiny_llama_dir}", f"output={tmp_path / 'runs'}", f"data.path={tmp_path / 'sums.jsonl'}",
            "export.verify=false", "eval.limit=2", "eval.max_tokens=4", "train.iters=2", "train.batch_size=2",
            "train.rank=4", "train.alpha=8", "train.save_every=2", "train.num_threads=1",
            "data.replay=0", "eval.regression=false", "eval.max_regression={}"]
    r = CliRunner().invoke(cli, ["run", "reasoning-demo", *[a for s in sets for a in ("--set", s)]], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = RunFolder(tmp_path / "runs" / "reasoning-demo")
    card = read_json(run.root / "data" / "data_card.json")["thinking"]
    assert card["records_with_reasoning"] > 0 and card["thinking_off"] == card["records_without_reasoning"] > 0
    modelfile = (run.root / "ollama" / "Modelfile").read_text(encoding="utf-8")
    assert "TEMPLATE family: qwen3" in modelfile and "\n# Thinking: the template's <think> block" in modelfile
    assert "$.IsThinkSet" in modelfile
    report = read_json(run.eval_report("json"))
    assert report["thinking"] == {"task": True, "think_off": False}
    assert all("think_off.exact_match" in m["metrics"] for m in report["models"])


def test_json_mode_on_a_thinking_template_answers_with_thinking_off(tiny_thinking_model):
    """response_format json_object constrains the reply to JSON: the prompt gets the empty think block
    (thinking off), as a JSON answer has no room for reasoning, and the reply is JSON."""
    from llama_cpp import Llama

    from edgetune.toolcalls import chat_handler

    llm = Llama(model_path=str(tiny_thinking_model[1]), n_ctx=512, n_threads=1, verbose=False)
    msgs = [{"role": "user", "content": "3+4?"}]
    plain = chat_handler(llama=llm, messages=msgs, max_tokens=1, temperature=0)
    js = chat_handler(llama=llm, messages=msgs, max_tokens=24, temperature=0, response_format={"type": "json_object"})
    assert js["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # + <think>\n\n</think>\n\n
    assert js["choices"][0]["message"]["content"].lstrip().startswith("{")
