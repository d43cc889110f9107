"""Against forgetting: replay and data.mix in the train split, gates for lower-is-better metrics,
registering a run that failed its gates only when forced, and golden sets checked against training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgetune import pipeline
from edgetune.cli import cli
from edgetune.config import DataConfig
from edgetune.errors import EdgetuneError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


TASK = [_chat(f"Ticket {i}: my order {1000 + i} is late.", json.dumps({"order": 1000 + i, "issue": "late"})) for i in range(40)]


# ------------------------------------------------------------------------------ shares
def test_mix_sources_are_checked_and_sized_to_their_share():
    from edgetune.data.replay import sources, wanted

    srcs = sources(DataConfig(replay=0.2, mix=[{"path": "g.jsonl", "share": 0.1}]))
    assert [(s.kind, s.share) for s in srcs] == [("replay", 0.2), ("file", 0.1)]
    n = wanted(70, srcs)  # 70 task rows are 70% of the final split: 100 rows, 20 replay and 10 mixed
    assert n == [20, 10]
    for bad, msg in (([{"path": "g.jsonl"}], "must be"), ([{"path": "g.jsonl", "share": 1.5}], "outside"),
                     ([{"path": "g.jsonl", "share": 0.5, "weight": 2}], "unknown key"),
                     ([{"path": "a", "share": 0.6}, {"path": "b", "share": 0.4}], "below 0.9")):
        with pytest.raises(EdgetuneError, match=msg):
            sources(DataConfig(mix=bad))
    with pytest.raises(EdgetuneError, match="data.replay"):
        DataConfig(replay=0.95)


def test_mix_puts_chat_and_text_rows_in_train_only(tmp_path, tokenizer_dir):
    from edgetune.data import prepare
    from edgetune.data.template import encode_example, load_tokenizer

    general = [_chat(f"Name a colour number {i}.", f"Colour {i} is blue.") for i in range(30)]
    general += [{"text": f"A plain paragraph of general text number {i}, about rivers and hills."} for i in range(30)]
    general.append(TASK[0])  # a task row in the general file is not added twice
    mix = _jsonl(tmp_path / "general.jsonl", general)
    cfg = DataConfig(mix=[{"path": str(mix), "share": 0.25}], valid_ratio=0.1, test_ratio=0.1, seed=3)
    card = prepare(_jsonl(tmp_path / "task.jsonl", TASK), tmp_path / "out", cfg, model_dir=tokenizer_dir)
    m = card["mix"]
    src = m["sources"][0]
    assert m["task_train_rows"] == card["splits"]["train"] - src["rows"]
    assert src["wanted"] == round(0.25 * m["task_train_rows"] / 0.75) and src["rows"] <= src["wanted"]
    assert src["available"] == 61 and src["kind"] == "file"
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").open()]
    texts = [r for r in rows if "text" in r]
    assert texts and len(texts) == src["text_rows"] and len(rows) == m["train_rows"]
    for split in ("valid", "test"):  # held-out splits stay the task's
        held = [json.loads(x) for x in (tmp_path / "out" / f"{split}.jsonl").open()]
        assert all("Ticket" in r["messages"][0]["content"] for r in held)
    tok = load_tokenizer(tokenizer_dir)
    for r in rows:  # every row of the mixed split encodes by its own layout
        assert encode_example(tok, r).n_loss > 0
    assert card["tokens"]["per_split"]["train"]["count"] == len(rows)


def test_mix_refuses_preference_data(tmp_path, tokenizer_dir):
    from edgetune.data import prepare

    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    with pytest.raises(EdgetuneError, match="preference pairs"):
        prepare(_jsonl(tmp_path / "p.jsonl", pairs), tmp_path / "out", DataConfig(replay=0.1), model_dir=tokenizer_dir)


@pytest.mark.slow
def test_replay_rows_are_the_base_models_own_answers_and_cached(tmp_path, demo_model_dir, monkeypatch):
    from edgetune.data import prepare
    from edgetune.data.replay import load_prompts

    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path / "home"))
    task = _jsonl(tmp_path / "task.jsonl", TASK[:12])
    cfg = DataConfig(replay=0.2, valid_ratio=0.1, test_ratio=0.1)  # 10 train rows: 2 replay rows
    card = prepare(task, tmp_path / "a", cfg, model_dir=demo_model_dir)
    src = card["mix"]["sources"][0]
    assert src["kind"] == "replay" and src["rows"] == src["wanted"] == 2 and src["generated_now"] >= 2
    assert Path(src["cache"]).is_file() and src["runner"].startswith("hf:")
    prompts = {p["prompt"] for p in load_prompts()}
    replayed = [r for r in map(json.loads, (tmp_path / "a" / "train.jsonl").open()) if r["messages"][0]["content"] in prompts]
    assert len(replayed) == 2 and all(r["messages"][1]["content"].strip() for r in replayed)
    again = prepare(task, tmp_path / "b", cfg, model_dir=demo_model_dir)["mix"]["sources"][0]
    assert again["generated_now"] == 0 and again["rows"] == 2  # from the cache
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()


def test_replay_prompts_are_not_the_regression_set():
    from edgetune.data import dedup as dd
    from edgetune.data.replay import load_prompts
    from edgetune.eval.data import load_regression

    prompts = [p["prompt"] for p in load_prompts()]
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    reg = [next(m["content"] for m in e.messages if m["role"] == "user") for e in load_regression()]
    sigs = dd.signatures(prompts + reg)
    hits = dd.cross_matches(sigs, 0.6, list(range(len(prompts))), list(range(len(prompts), len(prompts) + len(reg))))
    assert not hits, [reg[q - len(prompts)] for q in hits]


# ------------------------------------------------------------------------------ gates
def test_max_gate_is_for_lower_is_better_metrics():
    from edgetune.eval.gates import check_gates, describe

    models = [{"name": "base", "metrics": {"nll": 1.5}}, {"name": "tuned", "metrics": {"nll": 1.1}}]
    ok = check_gates(models, "base", {}, {}, {"nll": 1.2})
    assert ok["passed"] and [c["model"] for c in ok["checks"]] == ["tuned"]
    bad = check_gates(models, "base", {}, {}, {"nll": 1.0, "latency_p95_s": 2.0})
    assert not bad["passed"] and len(bad["failures"]) == 2
    assert describe(bad["failures"][0]) == "tuned: nll = 1.1, required <= 1"
    assert "missing" in describe(bad["failures"][1])  # a metric the model lacks fails, never passes silently


@pytest.fixture(scope="module")
def gated_run(tiny_llama_dir, tiny_recipe, tmp_path_factory):
    """A tiny run whose eval gate cannot pass (nll at most 0): it stops before registering."""
    tmp = tmp_path_factory.mktemp("gated")
    recipe = tiny_recipe(tmp, tiny_llama_dir, n=40, iters=1, batch_size=1, rank=2, alpha=4, save_every=1)
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["export"] = {"quants": ["q8_0"], "verify": False}
    raw["eval"] = {"limit": 2, "max_tokens": 2, "regression": False, "max": {"nll": 0.0}}
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETUNE_HOME", str(tmp / "home"))
        with pytest.raises(EdgetuneError, match=r"Eval gates failed: tuned: nll = .*required <= 0"):
            pipeline.run(pipeline.load_recipe(recipe), log=lambda s: None)
    return tmp / "runs" / "tiny"


def test_a_run_that_failed_its_gates_is_registered_only_when_forced(gated_run, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(cli, ["models", "register", str(gated_run)])
    assert r.exit_code != 0 and "failed its eval gates" in str(r.exception)
    r = CliRunner().invoke(cli, ["models", "register", str(gated_run), "--force"])
    assert r.exit_code == 0, r.output
    manifest = yaml.safe_load(next((tmp_path / "home").glob("tiny-triage/v1/manifest.yaml")).read_text())
    assert manifest["eval_gates"] == {"passed": False, "forced": True}


# ------------------------------------------------------------------------------ golden sets
def test_golden_set_overlapping_training_is_refused_unless_allowed(gated_run, tmp_path):
    from edgetune.eval.overlap import check

    train = gated_run / "data" / "train.jsonl"
    rows = [json.loads(x) for x in train.open()]
    near = json.loads(json.dumps(rows[1]))
    near["messages"][-1]["content"] += " "  # the same row with trailing whitespace: still a duplicate
    fresh = _chat("Something never seen in training at all, about lighthouses.", "{}")
    golden = _jsonl(tmp_path / "golden.jsonl", [rows[0], near, fresh])
    res = check(golden, train)
    assert (res["exact"], res["near"], res["eval_rows"]) == (2, 0, 3)
    assert res["rows"][0] == {"eval": f"{golden}:1", "train": f"{train}:1", "kind": "exact"}
    # a near duplicate: one word changed in a long row
    words = rows[2]["messages"][-1]["content"]
    long_row = _chat("Please summarise this ticket in detail: " + " ".join(f"word{i}" for i in range(60)), words)
    long_near = json.loads(json.dumps(long_row))
    long_near["messages"][0]["content"] = long_near["messages"][0]["content"].replace("word30", "term30")
    res = check(_jsonl(tmp_path / "g2.jsonl", [long_near]), _jsonl(tmp_path / "t2.jsonl", [long_row]))
    assert (res["exact"], res["near"]) == (0, 1)

    args = ["eval", str(gated_run), "--data", str(golden), "-m", f"t=hf:{gated_run / 'fused'}", "--limit", "1",
            "--max-tokens", "2", "--no-regression", "--max", "nll=100", "-o", str(tmp_path / "e")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0 and "overlaps the training split" in str(r.exception)
    assert "--allow-overlap" in r.exception.fix
    r = CliRunner().invoke(cli, [*args, "--allow-overlap"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["overlap"]["exact"] == 2
    # the run's own test split is not re-checked (data prepare already kept it apart)
    r = CliRunner().invoke(cli, ["eval", str(gated_run), "-m", f"t=hf:{gated_run / 'fused'}", "--limit", "1",
                                 "--max-tokens", "2", "--no-regression", "--max", "nll=100", "-o", str(tmp_path / "e3")])
    assert r.exit_code == 0, r.output
    assert "overlap" not in json.loads((tmp_path / "e3" / "report.json").read_text())
