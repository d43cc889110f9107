"""The regression set: its checks, the shipped rows' self-consistency, the user's own files (recipe
and CLI), and the per-category report. Only the last tests run a (tiny random) model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetune.config import EvalConfig, config_from_dict, load_config
from edgetune.errors import EdgetuneError
from edgetune.eval.data import (
    CHECKS,
    SHIPPED,
    combine_regression,
    is_refusal,
    load_regression,
    regression_count,
    regression_hashes,
    regression_sources,
    run_check,
    validate_check,
)
from edgetune.eval.report import to_markdown

CATEGORIES = {"instruction", "format", "arithmetic", "factual", "refusal", "benign", "multilingual"}
DEMO = Path(__file__).resolve().parents[1] / "edgetune" / "resources" / "demo" / "support_tickets.jsonl"


# ---------------------------------------------------------------- check types: pass and fail

CASES = [  # (check, passing answers, failing answers)
    ({"type": "contains", "value": "Paris"}, ["The capital is Paris.", "PARIS"], ["Lyon", ""]),
    ({"type": "contains_all", "value": ["bob", "40"]}, ["name,age\nBob,40"], ["Bob is 41", ""]),
    ({"type": "any_of", "value": ["rome", "roma"]}, ["Roma.", "It is Rome"], ["Milan", ""]),
    ({"type": "exact", "value": "Merci"}, ["merci!", " Merci "], ["Merci beaucoup", ""]),
    ({"type": "starts_with", "value": "The"}, ["The sea is calm.", '**The** sea', ' "the end"'],
     ["There is a sea.", "A sea.", ""]),
    ({"type": "starts_with", "value": "1."}, ["1. Mars"], ["2. Mars"]),
    ({"type": "regex", "value": r"^\W*(?-i:HELLO)\W*$"}, ["HELLO", "HELLO!"], ["hello", "HELLO there", ""]),
    ({"type": "number", "value": 1024}, ["The answer is 1,024.", "1024"], ["1023", "12 and 1024 and 3", ""]),
    ({"type": "number", "value": -7}, ["13 - 20 = -7"], ["7", ""]),
    ({"type": "max_words", "value": 2}, ["Blue", "light blue"], ["a light blue sky", ""]),
    ({"type": "lines", "value": 3}, ["a\nb\nc", "a\n\nb\nc\n"], ["a\nb", "a\nb\nc\nd", ""]),
    ({"type": "json_valid"}, ['{"a": 1}', "```json\n[1]\n```"], ["{a: 1}", "Here: {}", ""]),
    ({"type": "json_keys", "value": ["name", "age"]}, ['{"name": "Ana", "age": 30}', '{"name": 1, "age": 2, "x": 3}'],
     ['{"name": "Ana"}', '["name", "age"]', "name: Ana", ""]),
    ({"type": "json_keys", "value": ["name", "age"], "exact": True}, ['{"age": 30, "name": "Ana"}'],
     ['{"name": 1, "age": 2, "x": 3}']),
    ({"type": "json_equals", "value": [2, 4, 6]}, ["[2, 4, 6]", "[2.0, 4, 6]"], ["[2, 4]", "[6, 4, 2]", "2, 4, 6", ""]),
    ({"type": "json_equals", "value": {"ok": True}}, ['{"ok": true}'], ['{"ok": 1}', '{"ok": "true"}']),
    ({"type": "csv", "value": ["name", "age"]}, ["name,age\nBob,40", "```csv\nName, Age\nBob, 40\n```"],
     ["name,age", "Bob,40", "name,age\nBob", "name;age\nBob;40", ""]),
    ({"type": "refusal"}, ["I can't help with that.", "I'm sorry, but I cannot provide that."], ["Sure: step 1...", ""]),
    ({"type": "not_refusal"}, ["Use `kill PID`.", "Never mix bleach and ammonia: harmful gas."],
     ["I can't help with that.", "", "   "]),
    ({"type": "all", "value": [{"type": "max_words", "value": 1}, {"type": "contains", "value": "blue"}]},
     ["Blue."], ["Red.", "Blue sky", ""]),
    ({"type": "any", "value": [{"type": "refusal"}, {"type": "any_of", "value": ["crisis line"]}]},
     ["I won't help with that.", "Please call a crisis line now."], ["Here is how.", ""]),
]


@pytest.mark.parametrize("check,good,bad", CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_check_passes_right_answers_and_fails_wrong_ones(check, good, bad):
    validate_check(check, "t:1")
    for g in good:
        assert run_check(g, check) == 1.0, g
    for b in bad:
        assert run_check(b, check) == 0.0, b


def test_every_check_type_has_a_test():
    assert {c["type"] for c, _, _ in CASES} == set(CHECKS)


REFUSALS = [
    "I can't help with that.",
    "I can’t help with that request.",  # typographic apostrophe
    "I cannot provide instructions for making weapons.",
    "I won't write threats.",
    "I will not create malware.",
    "I'm not able to help with this.",
    "I am unable to assist with that.",
    "I must decline this request.",
    "Sorry, but I can't do that.",
    "I'm sorry, I can't assist with that.",
    "I'm really sorry you're feeling this way.",
    "As an AI, I cannot and will not help you hurt someone.",
    "That's not something I can help with.",
    "I can't.",
    "I don't feel comfortable helping with that.",
]
NOT_REFUSALS = [  # helpful answers that mention cannot / illegal / harmful / sorry / unable in passing
    "You cannot mix bleach and ammonia: it releases toxic, harmful chloramine gas.",
    "It is illegal to drive without insurance in most countries.",
    "If the process is unable to stop, send SIGKILL with kill -9 PID.",
    "I cannot stress enough how important a tripod is for night photos.",
    "Vaccines train the immune system; you can't catch the disease from an inactivated vaccine.",
    "Antibiotics cannot help with viral infections such as the flu.",
    "A process that won't die can be killed with `kill -9`.",
    "Say sorry when you bump into someone.",
    "If I can't find the PID, I use pkill -f python.",
    "I wouldn't give chocolate to a dog: it is toxic to them.",
    "Our support team is not able to help with refunds after 30 days, so ask the store instead.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusal_phrasings_are_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", NOT_REFUSALS)
def test_benign_answers_that_mention_cannot_are_not_refusals(text):
    assert not is_refusal(text)
    assert run_check(text, {"type": "not_refusal"}) == 1.0


@pytest.mark.parametrize("check,msg", [
    (None, "need a 'check'"),
    ({"type": "fuzzy"}, "type one of"),
    ("contains", "type one of"),
    ({"type": "contains"}, "Bad value"),
    ({"type": "contains", "value": "..."}, "Bad value"),  # only punctuation: would pass every answer
    ({"type": "any_of", "value": []}, "Bad value"),
    ({"type": "number", "value": "twelve"}, "Bad value"),
    ({"type": "max_words", "value": 0}, "Bad value"),
    ({"type": "lines", "value": True}, "Bad value"),
    ({"type": "regex", "value": "("}, "Invalid regex"),
    ({"type": "json_equals"}, "Bad value"),
    ({"type": "json_keys", "value": ["a"], "exact": "yes"}, "true or false"),
    ({"type": "refusal", "value": 1}, "takes no value"),
    ({"type": "contains", "valu": "x"}, "Unknown key"),
    ({"type": "contains", "value": "x", "exact": True}, "Unknown key"),
    ({"type": "all", "value": [{"type": "contains"}]}, "Bad value"),  # nested checks are validated too
])
def test_bad_checks_are_refused_with_where_and_fix(check, msg):
    with pytest.raises(EdgetuneError) as exc:
        validate_check(check, "golden.jsonl:3")
    assert msg in str(exc.value) and exc.value.where == "golden.jsonl:3"


# ---------------------------------------------------------------- the shipped set


@pytest.fixture(scope="module")
def shipped():
    return load_regression()


def test_shipped_set_size_and_categories(shipped):
    counts = Counter(e.category for e in shipped)
    assert len(shipped) >= 100
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 14, counts
    assert len({e.id for e in shipped}) == len(shipped)
    for e in shipped:  # short prompts: the answers fit regression_max_tokens (96)
        assert len(e.messages) == 1 and e.messages[0]["role"] == "user" and len(e.messages[0]["content"]) <= 160, e.id
        assert len(e.reference.split()) <= 40, e.id


def test_every_shipped_reference_passes_its_own_check(shipped):
    failing = [e.id for e in shipped if run_check(e.reference, e.check) != 1.0]
    assert not failing


def test_trivially_wrong_answers_fail_every_shipped_row(shipped):
    """"I don't know." and an empty answer fail every row. Refusal rows are the exception for
    "I don't know.": a non-answer to a harmful request is not compliance, and they measure
    declining, so it is left unscored; an empty answer and a compliant one fail them."""
    for e in shipped:
        assert run_check("", e.check) == 0.0, e.id
        if e.category == "refusal":
            assert run_check("Sure! Here is how to do it, step by step: first, get the materials.", e.check) == 0.0, e.id
        else:
            assert run_check("I don't know.", e.check) == 0.0, e.id


def test_refusal_and_benign_rows_mean_what_they_say(shipped):
    for e in shipped:
        if e.category == "refusal":
            assert is_refusal(e.reference) or "crisis" in e.reference, e.id
        if e.category == "benign":
            assert e.check["type"] == "all" and {"type": "not_refusal"} in e.check["value"], e.id
            assert run_check("I'm sorry, but I can't help with that.", e.check) == 0.0, e.id  # over-refusal fails


def test_answer_checks_reject_the_other_rows_answers(shipped):
    """In the categories with one right answer per row, no check accepts another row's reference
    (benign rows check the topic and refusal rows the declining, so there they overlap by design)."""
    for cat in CATEGORIES - {"benign", "refusal"}:
        rows = [e for e in shipped if e.category == cat]
        clashes = [(a.id, b.id) for a in rows for b in rows if a is not b and run_check(b.reference, a.check)]
        assert not clashes, clashes


def test_wrong_answers_of_the_right_shape_fail(shipped):
    by = {e.id: e.check for e in shipped}
    wrong = {"ar-01": "13", "ar-08": "7", "fact-01": "Lyon", "fact-02": "Ag", "fmt-02": "[1, 3, 5]", "fmt-05": "Tokyo",
             "if-02": "hello", "if-07": "Red, sure.", "if-16": "There is a sea.", "ml-01": "Milan", "ml-11": "8",
             "fmt-08": "name;age\nBob;40", "fmt-06": '{"city": "Paris"}', "ben-01": "I won't help you kill anything."}
    for i, answer in wrong.items():
        assert run_check(answer, by[i]) == 0.0, i


# ---------------------------------------------------------------- user files: sources and loading


def _row(prompt, answer, check, **extra):
    return json.dumps({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                       "check": check, **extra})


def test_regression_sources_and_the_cli_switches():
    assert regression_sources(True) == [SHIPPED] and regression_sources(False) == [] and regression_sources(None) == []
    assert regression_sources(["Shipped", "a.jsonl", "a.jsonl", "shipped"]) == [SHIPPED, "a.jsonl"]
    with pytest.raises(EdgetuneError):
        regression_sources([3])
    assert combine_regression(True, None) is True
    assert combine_regression(["a.jsonl"], None) == ["a.jsonl"]  # nothing on the command line: the recipe's
    assert combine_regression(True, None, ["g.jsonl"]) == [SHIPPED, "g.jsonl"]  # --regression-file adds
    assert combine_regression(False, None, ["g.jsonl"]) == ["g.jsonl"]
    assert combine_regression(True, False, ["g.jsonl"]) == ["g.jsonl"]  # --no-regression: your files only
    assert combine_regression(["a.jsonl"], False) is False  # --no-regression alone: nothing
    assert combine_regression(["a.jsonl"], True) == [SHIPPED, "a.jsonl"]  # --regression: the shipped set too
    assert combine_regression(False, True) is True


def test_eval_regression_in_recipes_and_overrides(tmp_path):
    def reg(v):
        return config_from_dict({"eval": {"regression": v}}).eval.regression

    assert reg(True) is True and reg(False) is False and reg("off") is False and reg(None) is False
    assert reg(["shipped", "golden.jsonl"]) == ["shipped", "golden.jsonl"]
    assert reg("shipped,golden.jsonl") == ["shipped", "golden.jsonl"] and reg([]) is False
    assert EvalConfig().regression is True and EvalConfig(regression="g.jsonl").regression == ["g.jsonl"]
    with pytest.raises(EdgetuneError):
        reg([1])
    with pytest.raises(EdgetuneError):
        reg({"a": 1})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\neval:\n  regression: [shipped, golden.jsonl]\n")
    assert load_config(recipe).eval.regression == ["shipped", "golden.jsonl"]
    assert load_config(recipe, ["eval.regression=false"]).eval.regression is False
    assert load_config(recipe, ["eval.regression=[shipped, other.jsonl]"]).eval.regression == ["shipped", "other.jsonl"]


def test_user_files_ids_categories_and_collisions(tmp_path, shipped):
    a = tmp_path / "golden.jsonl"
    a.write_text("\n".join([
        _row("Product name?", "Edgetune", {"type": "contains", "value": "edgetune"}, id="if-01"),  # a shipped id
        _row("Version?", "2", {"type": "number", "value": 2}, category="factual"),
        _row("Say hi", "hi", {"type": "exact", "value": "hi"}, id="hi"),
    ]) + "\n")
    b = tmp_path / "more" / "extra.jsonl"
    b.parent.mkdir()
    b.write_text(_row("Say hi", "hi", {"type": "exact", "value": "hi"}, id="hi") + "\n")
    reg = load_regression([SHIPPED, str(a), str(b)])
    assert len(reg) == len(shipped) + 4
    mine = {e.id: e for e in reg[len(shipped):]}
    assert set(mine) == {"golden/if-01", "golden:2", "hi", "extra/hi"}  # shipped ids never change
    assert mine["golden/if-01"].category == "golden" and mine["golden:2"].category == "factual"
    assert [e.id for e in reg[:len(shipped)]] == [e.id for e in shipped]
    assert len(load_regression([str(a)])) == 3 and load_regression(False) == []
    assert regression_count([SHIPPED, str(a), str(b)]) == len(reg)
    h = regression_hashes([SHIPPED, str(a), str(tmp_path / "gone.jsonl")])
    assert h[str(a)] and h[SHIPPED] and h[str(tmp_path / "gone.jsonl")] is None


@pytest.mark.parametrize("lines,where,msg", [
    ([_row("q", "a", {"type": "contains", "value": "a"}), json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})], 2, "need a 'check'"),
    ([_row("q", "a", {"type": "contans", "value": "a"})], 1, "type one of"),
    ([_row("q", "a", {"type": "regex", "value": "(a"})], 1, "Invalid regex"),
    ([_row("q", "a", {"type": "exact", "value": "a"}, id="x"), _row("q", "b", {"type": "exact", "value": "b"}, id="x")],
     2, "used twice"),
])
def test_bad_user_rows_are_refused_with_file_and_line(tmp_path, lines, where, msg):
    f = tmp_path / "golden.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(EdgetuneError) as exc:
        load_regression([SHIPPED, str(f)])
    assert msg in str(exc.value) and exc.value.where == f"{f}:{where}"
    assert exc.value.fix


def test_missing_user_file_is_named(tmp_path):
    with pytest.raises(EdgetuneError, match="Regression file not found"):
        load_regression([str(tmp_path / "nope.jsonl")])


# ---------------------------------------------------------------- the report


def _fake_report():
    def metrics(base_rate, cats):
        return {"exact_match": base_rate, "regression.pass_rate": sum(cats.values()) / len(cats),
                **{f"regression.per_category.{k}": v for k, v in cats.items()}}

    models = [{"name": "base", "spec": "hf:b", "metrics": metrics(0.2, {"refusal": 1.0, "arithmetic": 0.5})},
              {"name": "tuned", "spec": "hf:t", "metrics": metrics(0.8, {"refusal": 0.75, "arithmetic": 0.5})}]
    deltas = {"tuned": {k: v - models[0]["metrics"][k] for k, v in models[1]["metrics"].items()}}
    return {"data": "t.jsonl", "n_examples": {"task": 3, "regression": 6}, "baseline": "base", "headline": "exact_match",
            "seconds": 1.0, "models": models, "deltas": deltas, "examples": {},
            "regression": {"sources": ["shipped", "golden.jsonl"], "n_per_category": {"arithmetic": 2, "refusal": 4}}}


def test_markdown_has_a_per_category_table_with_deltas():
    md = to_markdown(_fake_report())
    assert "## Regression set by category" in md and "`golden.jsonl`" in md
    assert "| category | n | base (baseline) | tuned |" in md
    assert "| refusal | 4 | 100.0% | 75.0% (-25.0 pp ▼) |" in md
    assert "| arithmetic | 2 | 50.0% | 50.0% (+0.0 pp) |" in md
    assert "| **all** | 6 |" in md
    metrics_table = md.split("## Metrics")[1].split("## Regression set by category")[0]
    assert "per_category" not in metrics_table  # shown once, in their own table


# ---------------------------------------------------------------- end to end on a tiny model


@pytest.fixture()
def golden(tmp_path) -> Path:
    f = tmp_path / "golden.jsonl"
    f.write_text("\n".join([
        _row("Say ok", "ok", {"type": "contains", "value": "ok"}, id="ok"),
        _row("2+2?", "4", {"type": "number", "value": 4}, category="arithmetic"),
    ]) + "\n")
    return f


@pytest.fixture()
def task1(tmp_path) -> Path:
    p = tmp_path / "task.jsonl"
    p.write_text(DEMO.read_text().splitlines(keepends=True)[0])
    return p


def test_evaluate_runs_the_users_rows_per_category(tiny_llama_dir, task1, golden, tmp_path):
    from edgetune.eval import evaluate

    cfg = EvalConfig(max_tokens=2, regression_max_tokens=2, nll=False, limit=1, dtype="float32", regression=[str(golden)])
    report = evaluate(task1, [f"base=hf:{tiny_llama_dir}", f"again=hf:{tiny_llama_dir}"], tmp_path / "r", cfg)
    assert [r["id"] for r in report["examples"]["regression"]] == ["ok", "golden:2"]
    assert report["regression"] == {"sources": [str(golden)], "n_per_category": {"arithmetic": 1, "golden": 1}}
    for m in report["models"]:
        assert {"regression.pass_rate", "regression.per_category.golden", "regression.per_category.arithmetic"} <= set(m["metrics"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Regression set by category" in md and "| golden | 1 |" in md and "| base (baseline) | again |" in md
    assert "<h2>Regression set by category</h2>" in (tmp_path / "r" / "report.html").read_text()


def test_cli_regression_file(tiny_llama_dir, task1, golden, tmp_path):
    from edgetune.cli.eval import eval_group

    base = ["--data", str(task1), "-m", f"hf:{tiny_llama_dir}", "--max-tokens", "2", "--no-nll", "--limit", "1",
            "--dtype", "float32", "-o", str(tmp_path / "r")]
    res = CliRunner().invoke(eval_group, base + ["--no-regression", "--regression-file", str(golden)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["regression"]["sources"] == [str(golden)] and report["n_examples"]["regression"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_row("q", "a", {"type": "nope"}) + "\n")
    res = CliRunner().invoke(eval_group, base + ["--regression-file", str(bad)])
    assert res.exit_code != 0 and "bad.jsonl:1" in res.output + str(res.exception)


def test_run_refuses_a_bad_regression_file_before_training(tmp_path, tiny_llama_dir, tiny_recipe):
    from edgetune import pipeline

    bad = tmp_path / "bad.jsonl"
    bad.write_text(_row("q", "a", {"type": "contains"}) + "\n")
    cfg = pipeline.load_recipe(tiny_recipe(tmp_path, tiny_llama_dir), [f"eval.regression=[shipped, {bad}]"])
    assert cfg.eval.regression == [SHIPPED, str(bad)]
    with pytest.raises(EdgetuneError) as exc:
        pipeline.run(cfg, to_stage="train")
    assert exc.value.where == f"{bad}:1" and "Bad value" in str(exc.value)
    assert not (tmp_path / "runs" / "tiny" / "train").exists()
