"""GRPO rewards: every built-in on good, bad and unparseable completions, the spec grammar, user
functions from a module and from a file, weights summed, and every error a user can meet."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest

from edgetune.errors import EdgetuneError
from edgetune.train.rewards import (
    BUILTINS,
    Reward,
    check_references,
    last_number,
    parse_rewards,
    read_calls,
    score,
)


def one(spec: str, completion: str, reference: str | None = None, prompt: str = "p") -> float:
    """The raw value of a single reward on a single completion."""
    (reward,) = parse_rewards([spec])
    total, raw = score([reward], [prompt], [completion], [reference])
    assert total.dtype == np.float64 and total.shape == (1,)
    assert raw[reward.label][0] * reward.weight == pytest.approx(total[0])
    return float(raw[reward.label][0])


# ---------------------------------------------------------------- built-ins

def test_json_valid():
    assert one("json_valid", '{"a": 1}') == 1.0
    assert one("json_valid", '```json\n{"a": 1}\n```') == 1.0  # one fence allowed, as the eval metric
    assert one("json_valid", "[1, 2]") == 1.0
    assert one("json_valid", 'Sure! {"a": 1}') == 0.0
    assert one("json_valid", "") == 0.0


def test_json_fields_scores_the_fraction_of_reference_fields_and_garbage_is_zero():
    ref = json.dumps({"intent": "billing", "priority": 2, "customer": {"tier": "gold"}})
    assert one("json_fields", '{"intent": "Billing", "priority": 2, "customer": {"tier": "gold"}}', ref) == 1.0
    assert one("json_fields", '{"intent": "billing", "priority": "2", "extra": 1}', ref) == pytest.approx(1 / 3)
    assert one("json_fields", '```\n{"intent": "billing"}\n```', ref) == pytest.approx(1 / 3)
    for garbage in ('{"intent": "billing"', "not json at all", "", "\x00\x01}{", "[1, 2, 3]", "null"):
        assert one("json_fields", garbage, ref) == 0.0


def test_exact():
    assert one("exact", "Paris.", "paris") == 1.0
    assert one("exact", "  PARIS  ", "Paris") == 1.0
    assert one("exact", "Paris, France", "Paris") == 0.0


def test_regex():
    assert one(r"regex=^\d+$", "42") == 1.0
    assert one(r"regex=^\d+$", "42 apples") == 0.0
    assert one("regex=answer:", "The ANSWER: 3") == 1.0  # case-insensitive; ':' inside the pattern
    assert one("regex=a:b", "xa:by") == 1.0  # 'b' is not a float, so no weight was split off
    (r,) = parse_rewards([r"regex=x:2:1.5"])  # pattern 'x:2', weight 1.5
    assert (r.arg, r.weight) == ("x:2", 1.5)
    (r,) = parse_rewards(["regex=a=b"])  # ARG is everything after the first '='
    assert r.arg == "a=b"


def test_number():
    assert one("number", "so the total is 1,234.", "#### 1234") == 1.0
    assert one("number", "first 3 then 7", "7") == 1.0  # the last number counts
    assert one("number", "first 7 then 3", "7") == 0.0
    assert one("number", "-2.5", "answer: \u22122.5") == 1.0  # unicode minus in the reference
    assert one("number", "1e3", "1000") == 1.0
    assert one("number", "no digits here", "7") == 0.0
    assert one("number", "", "7") == 0.0
    assert one("number", "100.9", "100") == 0.0
    assert one("number=0.01", "100.9", "100") == 1.0  # relative tolerance 1%
    assert one("number=0.01", "102", "100") == 0.0
    assert last_number("x2") is None  # a number glued to a word is not one
    assert last_number("it costs $3.50.") == 3.5 and last_number("5-3") == 3 and last_number("(-4)") == -4


TOOL_REF = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'


def test_tool_call_against_a_reference_call():
    same_hermes = '<tool_call>{"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}</tool_call>'
    same_llama3 = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
    same_mistral = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]'
    for completion in (same_hermes, same_llama3, same_mistral):
        assert one("tool_call", completion, TOOL_REF) == 1.0, completion
    assert one("tool_call", same_hermes.replace("Paris", "Rome"), TOOL_REF) == 0.0
    assert one("tool_call", "It is sunny in Paris.", TOOL_REF) == 0.0
    assert one("tool_call", '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', TOOL_REF) == 0.0
    # an OpenAI-style structured reference works too
    openai_ref = json.dumps([{"type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "c"}'}}])
    assert one("tool_call", same_hermes, openai_ref) == 1.0


def test_tool_call_against_a_plain_answer_rewards_not_calling():
    assert one("tool_call", "Hello! How can I help?", "Hi there.") == 1.0
    assert one("tool_call", '{"answer": 3}', "Hi there.") == 1.0  # JSON that is not call-shaped is an answer
    assert one("tool_call", TOOL_REF, "Hi there.") == 0.0
    assert read_calls("plain text") == ([], None, False)


def test_length_penalty():
    assert one("length", "x" * 512) == 0.0
    assert one("length", "x" * 768) == pytest.approx(-0.5)
    assert one("length", "x" * 5000) == -1.0  # clipped
    assert one("length=10", "x" * 10) == 0.0
    assert one("length=10", "x" * 15) == pytest.approx(-0.5)
    assert one("length=10", "x" * 20) == -1.0
    assert one("length=10", "") == 0.0


# ---------------------------------------------------------------- parsing and weights

def test_specs_weights_and_labels():
    rewards = parse_rewards(["json_fields:1.0", "length:0.1", "regex=a", "regex=b:-0.5", "number=0.5:2", "json_valid"])
    assert [(r.label, r.weight, r.arg) for r in rewards] == [
        ("json_fields", 1.0, None), ("length", 0.1, None), ("regex", 1.0, "a"), ("regex_2", -0.5, "b"),
        ("number", 2.0, "0.5"), ("json_valid", 1.0, None)]
    assert [r.needs_reference for r in rewards] == [True, False, False, False, True, False]
    assert all(isinstance(r, Reward) for r in rewards)
    assert parse_rewards(("exact",))[0].label == "exact"  # a tuple is fine
    assert [r.label for r in parse_rewards(["exact", "exact", "exact:2"])] == ["exact", "exact_2", "exact_3"]


def test_weighted_sum():
    rewards = parse_rewards(["json_valid:2", "length=4:0.5", "regex=ok:-1"])
    completions = ['{"a":1}', "ok fine", "{}"]
    total, raw = score(rewards, ["p1", "p1", "p2"], completions, [None, None, None])
    assert raw["json_valid"].tolist() == [1.0, 0.0, 1.0]
    assert raw["length"].tolist() == pytest.approx([-0.75, -0.75, 0.0])
    assert raw["regex"].tolist() == [0.0, 1.0, 0.0]
    assert total.dtype == np.float64
    assert total.tolist() == pytest.approx([2 - 0.375, -0.375 - 1, 2.0])
    empty_total, empty_raw = score(rewards, [], [], [])
    assert empty_total.shape == (0,) and empty_raw["json_valid"].shape == (0,)


def test_user_function_from_a_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my_rewards.py").write_text(textwrap.dedent("""
        def score(prompts, completions, references):
            return [float(len(c) == len(p)) for p, c in zip(prompts, completions)]

        def kw_only(completions, **kwargs):
            assert set(kwargs) == {"prompts", "references"}
            return [1] * len(completions)
    """))
    monkeypatch.chdir(tmp_path)
    rewards = parse_rewards(["sub/my_rewards.py:score:0.5", "sub/my_rewards.py:kw_only"])
    assert [(r.name, r.label, r.weight, r.needs_reference) for r in rewards] == [
        ("sub/my_rewards.py:score", "my_rewards.py:score", 0.5, False),
        ("sub/my_rewards.py:kw_only", "my_rewards.py:kw_only", 1.0, False)]
    total, raw = score(rewards, ["ab", "ab"], ["xy", "xyz"], [None, "r"])
    assert raw["my_rewards.py:score"].tolist() == [1.0, 0.0]
    assert raw["my_rewards.py:kw_only"].tolist() == [1.0, 1.0]
    assert total.tolist() == [1.5, 1.0]


def test_user_function_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "et_reward_mod.py").write_text(textwrap.dedent("""
        import numpy as np

        def score(prompts, completions, references):
            return np.array([0.25 if r else 0.75 for r in references])
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    (reward,) = parse_rewards(["et_reward_mod:score:2"])
    assert (reward.label, reward.weight) == ("et_reward_mod:score", 2.0)
    total, raw = score([reward], ["a", "b"], ["x", "y"], ["ref", None])
    assert raw["et_reward_mod:score"].tolist() == [0.25, 0.75]
    assert total.tolist() == [0.5, 1.5]


def test_a_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "et_cwd_reward.py").write_text(
        "def f(prompts, completions, references):\n    return [1.0] * len(prompts)\n")
    monkeypatch.chdir(tmp_path)
    (reward,) = parse_rewards(["et_cwd_reward:f"])
    assert score([reward], ["p"], ["c"], [None])[0].tolist() == [1.0]


# ---------------------------------------------------------------- errors at parse time

def errors(specs) -> EdgetuneError:
    with pytest.raises(EdgetuneError) as info:
        parse_rewards(specs)
    return info.value


def test_no_reward_is_an_error_with_a_fix():
    err = errors([])
    assert "at least one reward" in err.message and "--reward json_valid" in err.fix


def test_unknown_name_lists_builtins_and_the_user_form():
    err = errors(["json_feilds"])
    assert "json_feilds" in err.message
    assert all(b in err.fix for b in BUILTINS) and "MODULE:FUNC" in err.fix and "file.py:FUNC" in err.fix
    assert "did you mean 'json_fields'" in err.fix
    err = errors(["et_no_such_module_xyz:score"])
    assert "et_no_such_module_xyz" in err.message and "MODULE:FUNC" in err.fix and "json_valid" in err.fix
    err = errors(["json_fields:abc"])  # a weight that is not a number
    assert "weight" in err.message and "abc" in err.message


def test_bad_arguments_are_errors_naming_the_spec():
    err = errors(["regex=([a-z"])
    assert "regex=([a-z" in err.message and "does not compile" in err.message and "regex=([a-z" in err.where
    assert "pattern" in errors(["regex"]).message
    assert "no argument" in errors(["json_valid=3"]).message
    assert "length" in errors(["length=0"]).message
    assert "length" in errors(["length=abc"]).message
    assert "tolerance" in errors(["number=-1"]).message
    assert "must be a number, not 'nan'" in errors(["exact:nan"]).message
    assert "too large" in errors(["exact:1e999"]).message
    assert "empty" in errors(["  "]).message


def test_bad_user_functions_are_errors(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text("NOT_A_FN = 3\n\ndef two_args(a, b):\n    return []\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.chdir(tmp_path)
    assert "no function 'missing'" in errors(["r.py:missing"]).message
    assert "not a function" in errors(["r.py:NOT_A_FN"]).message
    err = errors(["r.py:two_args"])
    assert "prompts=" in err.message and "def FUNC(prompts" in err.fix
    err = errors(["broken.py:f"])
    assert "boom at import" in err.message and isinstance(err.__cause__, RuntimeError)
    assert "does not exist" in errors(["nope.py:f"]).message


# ---------------------------------------------------------------- errors at check and score time

def test_missing_references_stop_before_training():
    rewards = parse_rewards(["json_valid", "json_fields"])
    refs = ['{"a": 1}', None, '{"a": 2}', "  ", None]
    with pytest.raises(EdgetuneError) as info:
        check_references(rewards, refs, "data/train.jsonl")
    err = info.value
    assert "3 of 5 rows" in err.message and "json_fields" in err.message and "json_valid" not in err.message
    assert err.where == "data/train.jsonl, row 2"
    assert "last assistant turn" in err.fix and "--reward json_fields" in err.fix
    check_references(parse_rewards(["json_valid", "length"]), [None, None], "x")  # nothing needs one
    check_references(rewards, ['{"a": 1}'], "x")


def test_references_a_reward_cannot_use_are_reported():
    with pytest.raises(EdgetuneError) as info:
        check_references(parse_rewards(["number"]), ["#### 4", "four", "five"], "d.jsonl")
    assert "2 of 3 rows" in info.value.message and "no number" in info.value.message
    assert info.value.where == "d.jsonl, row 2"
    with pytest.raises(EdgetuneError, match="not JSON"):
        check_references(parse_rewards(["json_fields"]), ['{"a": 1}', "plain"], "d.jsonl")
    with pytest.raises(EdgetuneError, match="malformed"):
        check_references(parse_rewards(["tool_call"]), ["<tool_call>{oops</tool_call>"], "d.jsonl")
    check_references(parse_rewards(["tool_call", "exact"]), [TOOL_REF, "plain answer"], "d.jsonl")


def _user(tmp_path, monkeypatch, body: str) -> Reward:
    (tmp_path / "user_reward.py").write_text(textwrap.dedent(body))
    monkeypatch.chdir(tmp_path)
    return parse_rewards(["user_reward.py:f"])[0]


LONG_PROMPT = "Summarise the following ticket in JSON. " * 10


def test_a_raising_user_function_names_the_reward_and_the_batch_prompt(tmp_path, monkeypatch):
    reward = _user(tmp_path, monkeypatch, """
        def f(prompts, completions, references):
            raise KeyError("label")
    """)
    with pytest.raises(EdgetuneError) as info:
        score([reward], [LONG_PROMPT, "second"], ["a", "b"], [None, None])
    err = info.value
    assert "user_reward.py:f" in err.message and "KeyError" in err.message
    assert "Summarise the following" in err.message and "second" not in err.message
    assert len(err.message) < 300  # the prompt is truncated
    assert isinstance(err.__cause__, KeyError)


def test_a_failing_builtin_names_the_prompt_of_the_failing_row():
    (reward,) = parse_rewards(["number"])
    with pytest.raises(EdgetuneError) as info:  # check_references would have caught it; score still explains
        score([reward], ["first prompt", "second prompt"], ["1", "2"], ["1", "no number"])
    err = info.value
    assert "number" in err.message and "'second prompt'" in err.message and "first prompt" not in err.message
    assert isinstance(err.__cause__, ValueError)


def test_wrong_count_nan_and_non_numeric_values(tmp_path, monkeypatch):
    wrong = _user(tmp_path, monkeypatch, "def f(prompts, completions, references):\n    return [1.0]\n")
    with pytest.raises(EdgetuneError) as info:
        score([wrong], ["a", "b", "c"], ["x", "y", "z"], [None] * 3)
    assert "user_reward.py:f" in info.value.message and "1 values for 3 completions" in info.value.message

    (tmp_path / "bad_values.py").write_text(textwrap.dedent("""
        def nan(prompts, completions, references):
            return [1.0, float("nan")]

        def inf(prompts, completions, references):
            return [float("-inf"), 0.0]

        def text(prompts, completions, references):
            return [1.0, "high"]

        def none(prompts, completions, references):
            return [None, 1.0]

        def scalar(prompts, completions, references):
            return 1.0
    """))
    prompts = ["first prompt", "second prompt"]
    for func, needle, at in (("nan", "nan", "second"), ("inf", "-inf", "first"), ("text", "'high'", "second"),
                             ("none", "None", "first")):
        (reward,) = parse_rewards([f"bad_values.py:{func}"])
        with pytest.raises(EdgetuneError) as info:
            score([reward], prompts, ["a", "b"], [None, None])
        msg = info.value.message
        assert f"bad_values.py:{func}" in msg and needle in msg and f"'{at} prompt'" in msg, msg
    (reward,) = parse_rewards(["bad_values.py:scalar"])
    with pytest.raises(EdgetuneError, match="returned a float, not a list of 2 floats"):
        score([reward], prompts, ["a", "b"], [None, None])


def test_json_rewards_never_crash_on_garbage():
    rewards = parse_rewards(["json_valid", "json_fields", "tool_call", "number", "exact", "regex=x", "length"])
    garbage = ["", "{", "}{", "\x00", "[[[[", '{"a": }', "```json\n{oops\n```", "null", "NaN", "<tool_call>",
               "[TOOL_CALLS]", "{" * 500]
    ref = '{"a": 1, "b": [1, 2]}'
    total, raw = score(rewards, ["p"] * len(garbage), garbage, [ref] * len(garbage))
    assert np.isfinite(total).all()
    assert raw["json_fields"].tolist() == [0.0] * len(garbage)
    assert raw["json_valid"].tolist() == [float(g in ("null", "NaN")) for g in garbage]  # json.loads takes NaN
    assert all(math.isfinite(v) for values in raw.values() for v in values)
