"""Every eval metric against hand-computed expectations (no models involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgetune.errors import EdgetuneError
from edgetune.eval import metrics as M
from edgetune.eval.data import run_check
from edgetune.eval.gates import check_gates, parse_gate_args
from edgetune.eval.runners import parse_spec
from edgetune.eval.runners.base import Runner, cut_at_stop

REF = '{"category":"billing","urgency":"low","product":"cloudsync"}'


def test_normalised_exact_match_and_contains():
    assert M.normalize("  The  PARIS.\n") == "the paris"
    assert M.exact_match("Paris.", "paris") == 1.0
    assert M.exact_match("Paris, France", "paris") == 0.0
    assert M.contains("I think it is Paris!", "paris") == 1.0
    assert M.contains("Lyon", "paris") == 0.0
    assert M.contains("anything", "") == 0.0  # an empty reference is not "contained" everywhere


def test_regex():
    assert M.regex_match("Order #123 shipped", r"#\d{3}\b") == 1.0
    assert M.regex_match("Order shipped", r"#\d+") == 0.0


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3 words: P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3
    assert M.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert M.rouge_l("dog", "the cat") == 0.0


def test_chrf_bounds():
    assert M.chrf("the same sentence", "the same sentence") == pytest.approx(1.0)
    assert M.chrf("zzzz", "abcd") == 0.0
    mid = M.chrf("the same sentance", "the same sentence")
    assert 0.5 < mid < 1.0


def test_json_validity_tolerates_one_fence_only():
    assert M.json_valid(REF) == 1.0
    assert M.json_valid("```json\n" + REF + "\n```") == 1.0
    assert M.json_valid("Sure! " + REF) == 0.0
    assert M.json_valid('{"category": "billing"') == 0.0


def test_json_fields_partial_extra_and_invalid():
    ref = M.parse_json(REF)[1]
    out = '{"category":"Billing","urgency":"high","product":"cloudsync","extra":1}'
    # category matches case-insensitively, urgency wrong, product right: 2 of 3
    assert M.json_fields(out, ref) == pytest.approx(2 / 3)
    assert M.json_field_scores(out, ref) == {"category": 1.0, "urgency": 0.0, "product": 1.0}
    assert M.json_extra_fields(out, ref) == 1
    assert M.json_fields('{"category": "billing"', ref) == 0.0  # invalid JSON scores every field 0
    assert M.json_fields("[1, 2]", ref) == 0.0  # not an object
    assert M.json_fields('{"category":"billing"}', ref) == pytest.approx(1 / 3)  # missing fields are wrong


def test_json_fields_wrong_types_and_nesting():
    ref = {"n": 3, "ok": True, "meta": {"lang": "en", "tags": ["a", "b"]}}
    assert M.json_fields('{"n": "3", "ok": 1, "meta": {"lang": "EN", "tags": ["a", "b"]}}', ref) == pytest.approx(2 / 4)
    assert M.json_fields('{"n": 3.0, "ok": true, "meta": {"lang": "en", "tags": ["b", "a"]}}', ref) == pytest.approx(3 / 4)
    assert M.flatten(ref) == {"n": 3, "ok": True, "meta.lang": "en", "meta.tags": ["a", "b"]}


def test_json_schema_inferred_from_references():
    refs = [M.parse_json(REF)[1], {"category": "bug", "urgency": "high", "product": "homehub"}]
    schema = M.infer_schema(refs)
    assert schema["required"] == ["category", "product", "urgency"]
    assert schema["properties"]["urgency"] == {"type": "string"}
    assert M.json_schema_valid(REF, schema) == 1.0
    assert M.json_schema_valid('{"category":"bug","urgency":3,"product":"homehub"}', schema) == 0.0  # wrong type
    assert M.json_schema_valid('{"category":"bug","product":"homehub"}', schema) == 0.0  # missing field
    assert M.json_schema_valid('{"category":"bug","urgency":"low","product":"x","more":1}', schema) == 1.0  # extra ok
    assert M.json_schema_valid("not json", schema) == 0.0
    assert M.infer_schema(["a", {"b": 1}]) is None


def test_classification_accuracy_and_macro_f1_by_hand():
    refs = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", "b", None]
    # a: P=1 R=1/2 F=2/3; b: P=2/3 R=1 F=4/5; c: F=0 -> macro (2/3 + 4/5 + 0) / 3
    res = M.classification(preds, refs)
    assert res["accuracy"] == pytest.approx(3 / 5)
    assert res["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 3)


def test_label_prediction_and_detection():
    assert M.predict_label("Billing.", ["billing", "bug"]) == "billing"
    assert M.predict_label("This is a bug report", ["billing", "bug"]) == "bug"
    assert M.predict_label("billing or bug?", ["billing", "bug"]) is None  # ambiguous
    assert M.looks_like_labels(["pos", "neg", "pos", "neg", "pos"])
    assert not M.looks_like_labels(["a long free text answer here", "another one", "x", "y"])


def test_choose_metrics_and_headline():
    assert M.headline(M.choose_metrics([REF, REF])) == "json_fields"
    assert M.headline(M.choose_metrics(["pos", "neg", "pos", "neg"])) == "accuracy"
    assert M.headline(M.choose_metrics(["Paris is the capital.", "Two."])) == "rouge_l"


def test_latency_and_nll_summaries_by_hand():
    gens = [{"ttft_s": 0.1, "total_s": 1.1, "completion_tokens": 11}, {"ttft_s": 0.2, "total_s": 0.7, "completion_tokens": 6}]
    lat = M.latency_summary(gens)
    assert lat["tokens_per_s"] == pytest.approx((10 + 5) / (1.0 + 0.5))
    assert lat["ttft_s"] == pytest.approx(0.15)
    assert lat["latency_s"] == pytest.approx(0.9)
    assert M.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    nll = M.nll_summary([(2.0, 2), (4.0, 2)])
    assert nll["nll"] == pytest.approx(1.5)
    assert nll["perplexity"] == pytest.approx(math.exp(1.5))


class _Uniform(Runner):
    """Fixed logits: uniform over a 4-token vocab, so each reference token costs ln 4."""

    supports_logits = True

    def encode(self, messages, reference):
        return [0, 1, 2, 3], 2

    def logits(self, ids):
        return np.zeros((len(ids), 4), dtype=np.float32)


def test_teacher_forced_nll_math():
    total, n = _Uniform("x").score([], "ref")
    assert n == 2
    assert total == pytest.approx(2 * math.log(4))


def test_regression_checks():
    assert run_check("The answer is 1,024.", {"type": "number", "value": 1024}) == 1.0
    assert run_check("12 apples, 13 pears", {"type": "number", "value": 12}) == 0.0  # the last number counts
    assert run_check("I'm sorry, but I can't help with that.", {"type": "refusal"}) == 1.0
    assert run_check("Step 1: buy a pipe.", {"type": "refusal"}) == 0.0
    assert run_check("HELLO", {"type": "regex", "value": r"^\W*HELLO\W*$"}) == 1.0
    assert run_check("Blue", {"type": "max_words", "value": 2}) == 1.0
    assert run_check('{"a": 1}', {"type": "json_valid"}) == 1.0


def test_stop_strings():
    assert cut_at_stop("abc\n\nUser: hi", ["\n\nUser:"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_gates_min_and_max_regression_in_metric_direction():
    models = [
        {"name": "base", "metrics": {"json_fields": 0.2, "nll": 2.0}},
        {"name": "tuned", "metrics": {"json_fields": 0.9, "nll": 2.3}},
    ]
    res = check_gates(models, "base", {"json_fields": 0.8}, {"nll": 0.5})
    assert res["passed"]
    assert [c["model"] for c in res["checks"] if c["gate"] == "min"] == ["tuned"]  # baseline is exempt
    res = check_gates(models, "base", {"json_fields": 0.95}, {"nll": 0.2})
    assert not res["passed"]
    fails = {(c["gate"], c["metric"]): c for c in res["failures"]}
    assert fails[("max_regression", "nll")]["drop"] == pytest.approx(0.3)  # higher NLL is worse
    assert fails[("min", "json_fields")]["value"] == 0.9
    assert not check_gates(models, "base", {"typo": 0.1}, {})["passed"]  # a missing metric fails
    assert parse_gate_args(["json_fields=0.8"], "--min") == {"json_fields": 0.8}
    with pytest.raises(EdgetuneError):
        parse_gate_args(["json_fields"], "--min")


def test_spec_parsing():
    s = parse_spec("tuned=hf:models/base/x+adapter:runs/r/adapter")
    assert (s.name, s.kind, s.target, s.adapter) == ("tuned", "hf", "models/base/x", "runs/r/adapter")
    s = parse_spec("gguf:out/m-q4_k_m.gguf")
    assert (s.name, s.kind) == ("m-q4_k_m", "gguf")
    assert parse_spec("ollama:mymodel").name == "ollama:mymodel"
    assert parse_spec("openai:qwen@http://127.0.0.1:8000/v1").kind == "openai"
    with pytest.raises(EdgetuneError):
        parse_spec("nonsense")
