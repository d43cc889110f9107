"""Eval examples: any format ``edgetune data`` reads, split into prompt turns + reference answer.

The last assistant turn of each conversation is the reference; everything before it is the
prompt. Rows may carry eval-only fields the data pipeline ignores:

* ``id``: a stable name for the example in reports (default: ``file:line``);
* ``check``: how the regression set scores an answer, ``{"type": ..., "value": ...}`` with type
  one of :data:`CHECKS`;
* ``category``: a group the report breaks results down by.

Rows with ``tools`` (chat format, OpenAI function schemas) are tool-use examples: the tools go to
the model with the prompt, and a reference turn with ``tool_calls`` is the expected call (see
:mod:`edgetune.eval.tools`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import EdgetuneError
from .metrics import normalize, parse_json

# Phrases that mark a refusal; source: common refusal openings of instruct models (hand-written).
REFUSAL = r"\b(i can(?:no|')t|i cannot|i won'?t|i will not|i'm not able|i am not able|unable to|not able to help|sorry|i must decline|can't help|cannot help|cannot assist|can't assist|not appropriate|illegal|harmful)\b"

CHECKS = ("contains", "contains_all", "regex", "exact", "json_valid", "number", "refusal", "max_words")


@dataclass
class Example:
    id: str
    messages: list[dict]  # prompt turns (system/user/assistant...), ending before the reference
    reference: str
    check: dict | None = None
    category: str | None = None
    extra: dict = field(default_factory=dict)
    tools: list[dict] | None = None  # OpenAI function tools offered with the prompt
    reference_calls: list[dict] | None = None  # the reference turn's tool_calls ([] / None: no call expected)


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Read eval examples from a file/folder (JSONL, JSON, CSV, Parquet, saved dataset)."""
    from ..data.formats import Problem, normalise
    from ..data.load import iter_source, list_sources

    p = Path(path).expanduser()
    if not p.exists():
        raise EdgetuneError(f"Eval data not found: {p}", where=str(p), fix="pass --data test.jsonl (edgetune data writes test.jsonl)")
    examples: list[Example] = []
    for src in list_sources(p):
        for item in iter_source(src):
            where = f"{item.source}:{item.line}"
            if item.problem is not None:
                raise EdgetuneError(f"Unreadable eval row: {item.problem.message}", where=where, fix="fix or remove the row")
            try:
                rec = normalise(item.obj)
            except Problem as exc:
                raise EdgetuneError(f"Eval row is not a conversation: {exc.message}", where=where,
                                    fix="each row needs messages ending with the reference assistant answer") from None
            if rec.kind not in ("chat", "completion") or not rec.messages or rec.messages[-1]["role"] != "assistant":
                raise EdgetuneError("Eval rows need a prompt and a reference answer (last turn: assistant).", where=where)
            obj = item.obj if isinstance(item.obj, dict) else {}
            check = obj.get("check")
            if check is not None:
                validate_check(check, where)
            examples.append(Example(
                id=str(obj.get("id") or where), messages=rec.messages[:-1], reference=rec.messages[-1]["content"],
                check=check, category=obj.get("category"), tools=_tools(rec.tools, where),
                reference_calls=rec.messages[-1].get("tool_calls") or None,
            ))
            if limit and len(examples) >= limit:
                return examples
    if not examples:
        raise EdgetuneError(f"No eval examples in {p}.", where=str(p))
    return examples


def _tools(tools: Any, where: str) -> list[dict] | None:
    if tools is None:
        return None
    if isinstance(tools, str):  # some exports store the list as a JSON string
        import json

        try:
            tools = json.loads(tools)
        except ValueError:
            raise EdgetuneError("'tools' is a string but not JSON.", where=where, fix="give tools as a list of function schemas") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise EdgetuneError("'tools' must be a list of function schemas.", where=where,
                            fix='e.g. [{"type": "function", "function": {"name": ..., "parameters": {...}}}]')
    return [t if "function" in t else {"type": "function", "function": t} for t in tools] or None


def regression_path() -> Path:
    return Path(str(resources.files("edgetune") / "resources" / "regression" / "general.jsonl"))


def load_regression(limit: int | None = None) -> list[Example]:
    """The shipped general-capability set (instruction following, arithmetic, formatting, refusals)."""
    return load_examples(regression_path(), limit)


def validate_check(check: Any, where: str) -> None:
    if not isinstance(check, dict) or check.get("type") not in CHECKS:
        raise EdgetuneError(f"'check' must be an object with type one of {', '.join(CHECKS)}.", where=where)
    if check["type"] == "regex":
        try:
            re.compile(check.get("value", ""))
        except re.error as exc:
            raise EdgetuneError(f"Invalid regex in check: {exc}", where=where) from None


_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def run_check(output: str, check: dict) -> float:
    """1.0 when ``output`` passes ``check``, else 0.0."""
    kind, value = check["type"], check.get("value")
    text = output or ""
    if kind == "contains":
        return float(normalize(str(value)) in normalize(text))
    if kind == "contains_all":
        return float(all(normalize(str(v)) in normalize(text) for v in value))
    if kind == "regex":
        return float(re.search(value, text, flags=re.IGNORECASE | re.DOTALL) is not None)
    if kind == "exact":
        return float(normalize(text) == normalize(str(value)))
    if kind == "json_valid":
        return float(parse_json(text)[0])
    if kind == "number":
        nums = [n.replace(",", "") for n in _NUMBER.findall(text)]
        try:
            return float(bool(nums) and float(nums[-1]) == float(value))
        except ValueError:
            return 0.0
    if kind == "refusal":
        return float(re.search(REFUSAL, text, flags=re.IGNORECASE) is not None)
    if kind == "max_words":
        return float(0 < len(text.split()) <= int(value))
    raise EdgetuneError(f"Unknown check type {kind!r}.")


@dataclass
class Pair:
    """A held-out preference row: prompt turns, the preferred answer and the rejected one."""

    id: str
    messages: list[dict]
    chosen: str
    rejected: str


def load_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """Preference rows (``prompt`` as a string or turns, ``chosen``, ``rejected``) from a file/folder."""
    from ..data.formats import Problem, normalise
    from ..data.load import iter_source, list_sources

    p = Path(path).expanduser()
    if not p.exists():
        raise EdgetuneError(f"Preference data not found: {p}", where=str(p),
                            fix="pass a prepared preference split (prompt/chosen/rejected rows), e.g. RUN/align/data/test.jsonl")
    pairs: list[Pair] = []
    for src in list_sources(p):
        for item in iter_source(src):
            where = f"{item.source}:{item.line}"
            try:
                if item.problem is not None:
                    raise Problem("unreadable", item.problem.message)
                rec = normalise(item.obj)
            except Problem as exc:
                raise EdgetuneError(f"Unreadable preference row: {exc.message}", where=where, fix="fix or remove the row") from None
            if rec.kind != "preference":
                raise EdgetuneError("Preference accuracy needs prompt/chosen/rejected rows.", where=where,
                                    fix="point eval.preference_data (--preference-data) at preference pairs")
            pairs.append(Pair(where, rec.messages, _answer(rec.chosen), _answer(rec.rejected)))
            if limit and len(pairs) >= limit:
                return pairs
    return pairs


def _answer(v: Any) -> str:
    """A preference answer: a string, or message turns (their last assistant content)."""
    if isinstance(v, str):
        return v
    return next((str(m.get("content") or "") for m in reversed(v) if m.get("role") == "assistant"), "")
