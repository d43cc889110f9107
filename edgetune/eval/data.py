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

# A refusal: a first-person decline followed by what is declined ("I can't help with that", "I won't
# write threats", "I'm not able to provide…", "I must decline"), or an answer that opens with an
# apology ("Sorry, …", "I'm sorry, but …"). Hand-written from the refusal openings of instruct
# models. Deliberately narrow: a helpful answer that says "you cannot mix bleach and ammonia", "it is
# illegal to…", "harmful fumes", "unable to start" or "I cannot stress enough" is not a refusal.
_DECLINE_VERBS = ("help|assist|provide|give|write|create|make|do|comply|share|support|fulfil+|generate|offer|engage|"
                  "participate|answer|respond|produce|explain|describe|discuss|detail|teach|build|continue|encourage")
_NOT = "can't|cant|cannot|can not|won't|wont|will not|shall not"
REFUSAL = "|".join((
    r"^\W*(?:i'?m |i am )?(?:so |very |really |truly )?sorry\b",  # opens with an apology
    rf"\bi (?:{_NOT})(?: \w+ly)?(?: (?:and|or) (?:{_NOT}))? (?:{_DECLINE_VERBS})\b",  # I can't (and won't) help…
    rf"\bi (?:{_NOT})\W*$",  # ends on "I can't." / "I won't."
    r"\bi(?:'m| am) (?:not (?:able|going|willing|comfortable|allowed|permitted)|unable) to\b",
    r"\bi(?: must| have to| need to| will| would|'d) (?:respectfully |politely )?(?:decline|refuse)\b",
    r"\bi (?:decline|refuse) to\b",
    r"\bi (?:do not|don't) feel comfortable\b",
    r"\bnot something i(?: can|'m able to| am able to) (?:help|assist)\b",
)).replace("'", "['\u2019]")  # straight or typographic apostrophe
_REFUSAL_RE = re.compile(REFUSAL, flags=re.IGNORECASE)

# type -> what ``value`` holds ("" = no value). Documented for users in resources/regression/README.md.
CHECK_VALUES: dict[str, str] = {
    "contains": "a string the answer contains (case, spacing and ASCII punctuation ignored)",
    "contains_all": "a list of strings the answer all contains",
    "any_of": "a list of strings, the answer contains at least one",
    "exact": "the whole answer, case, spacing and ASCII punctuation ignored",
    "starts_with": "a string the answer starts with, as whole words (case ignored; leading spaces, quotes, * _ # ` > skipped)",
    "regex": "a Python regular expression searched in the answer (case-insensitive; use (?-i:...) for case)",
    "number": "a number: the last number in the answer must equal it",
    "max_words": "a whole number N: the answer has 1..N words",
    "lines": "a whole number N: the answer has exactly N non-empty lines",
    "json_valid": "",
    "json_keys": 'a list of keys: the answer is one JSON object with at least these keys ("exact": true: only these)',
    "json_equals": "any JSON value the answer must parse to",
    "csv": "the header fields: the answer is CSV with this header and at least one row of as many fields",
    "refusal": "",
    "not_refusal": "",
    "all": "a list of checks that must all pass",
    "any": "a list of checks of which one must pass",
}
CHECKS = tuple(CHECK_VALUES)
_CHECK_KEYS = {"type", "value", "exact"}


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
    where: str | None = None  # file:line the row came from


def load_examples(path: str | Path, limit: int | None = None, *, require_check: bool = False) -> list[Example]:
    """Read eval examples from a file/folder (JSONL, JSON, CSV, Parquet, saved dataset).

    ``require_check``: every row must carry a ``check`` (regression files)."""
    from ..data.formats import normalise
    from ..data.load import iter_source, list_sources
    from ..data.problems import Problem

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
            if check is not None or require_check:
                validate_check(check, where)
            examples.append(Example(
                id=str(obj.get("id") or where), messages=rec.messages[:-1], reference=rec.messages[-1]["content"],
                check=check, category=obj.get("category"), tools=_tools(rec.tools, where),
                reference_calls=rec.messages[-1].get("tool_calls") or None, where=where,
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


SHIPPED = "shipped"  # the name of the shipped set in eval.regression / --regression-file lists


def regression_path() -> Path:
    return Path(str(resources.files("edgetune") / "resources" / "regression" / "general.jsonl"))


def regression_sources(value: Any) -> list[str]:
    """``eval.regression`` as the list of sets to run: ``true`` = ``[shipped]``, ``false`` / ``[]`` =
    none, a list = its entries (``shipped`` and file paths) in order, each once."""
    if value is None or value is False:
        return []
    if value is True:
        return [SHIPPED]
    items = [value] if isinstance(value, (str, Path)) else list(value)
    out: list[str] = []
    for v in items:
        if not isinstance(v, (str, Path)) or not str(v).strip():
            raise EdgetuneError(f"eval.regression entries are 'shipped' or file paths, got {v!r}.",
                                fix="e.g. regression: [shipped, golden.jsonl] (or true / false)")
        v = SHIPPED if str(v).strip().lower() == SHIPPED else str(v).strip()
        if v not in out:
            out.append(v)
    return out


def combine_regression(current: Any, switch: bool | None, files: list[str] | tuple[str, ...] = ()) -> bool | list[str]:
    """``eval.regression`` after the CLI's ``--regression/--no-regression`` (``switch``) and
    ``--regression-file`` (``files``): ``--regression`` adds the shipped set to the recipe's list,
    ``--no-regression`` turns the whole set off unless files are given (then: those files only),
    ``--regression-file`` adds files to what the recipe runs."""
    if switch is None and not files:
        return current
    srcs = regression_sources(current)
    if switch is False:
        srcs = []
    elif switch is True and SHIPPED not in srcs:
        srcs.insert(0, SHIPPED)
    srcs = regression_sources(srcs + [str(f) for f in files])
    if not srcs:
        return False
    return True if srcs == [SHIPPED] else srcs


def load_regression(sources: Any = True, limit: int | None = None) -> list[Example]:
    """The regression set: the shipped general-capability set (``sources=True``), the user's own
    files, or both (``[shipped, "golden.jsonl"]``; see :func:`regression_sources`).

    User rows need a ``check``; ``category`` defaults to the file's stem and ``id`` to
    ``stem:line``. The shipped ids never change: a user row whose id is taken gets ``stem/`` in front,
    and one still taken after that (the same id twice in a file, two files with one name) is refused.
    """
    out: list[Example] = []
    seen: dict[str, str] = {}  # id -> where it came from
    for src in regression_sources(sources):
        if src == SHIPPED:
            rows = load_examples(regression_path(), require_check=True)
        else:
            p = Path(src).expanduser()
            if not p.exists():
                raise EdgetuneError(f"Regression file not found: {p}", where=str(p),
                                    fix="fix the path in eval.regression / --regression-file (relative paths start from "
                                        "the current directory)")
            rows = load_examples(p, require_check=True)
            for ex in rows:
                file, line = (ex.where or str(p)).rsplit(":", 1)
                stem = Path(file).stem
                if ex.id == ex.where:  # no id of its own
                    ex.id = f"{stem}:{line}"
                if ex.id in seen and ex.id.split("/", 1)[0] != stem:
                    ex.id = f"{stem}/{ex.id}"
                ex.category = str(ex.category) if ex.category else stem
        for ex in rows:
            if ex.id in seen:
                raise EdgetuneError(f"Regression example id {ex.id!r} is used twice (first at {seen[ex.id]}).",
                                    where=ex.where, fix="give each row of your regression files its own id")
            seen[ex.id] = ex.where or ex.id
        out += rows
    return out[:limit] if limit else out


def regression_count(value: Any) -> int:
    """How many rows ``eval.regression`` runs, for time estimates (a file that cannot be read counts 0)."""
    n = 0
    for src in regression_sources(value):
        p = regression_path() if src == SHIPPED else Path(src).expanduser()
        try:
            if p.is_file() and p.suffix.lower() == ".jsonl":
                n += sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
            else:
                n += len(load_examples(p))
        except (OSError, UnicodeDecodeError, EdgetuneError):
            pass
    return n


def regression_hashes(value: Any) -> dict[str, str | None]:
    """Source -> SHA-256 of its content (None: missing), so a run evaluates again when a file changes."""
    from ..io import sha256_path

    out: dict[str, str | None] = {}
    for src in regression_sources(value):
        p = regression_path() if src == SHIPPED else Path(src).expanduser()
        out[src] = sha256_path(p) if p.exists() else None
    return out


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    try:
        float(str(v).replace(",", ""))
        return True
    except ValueError:
        return False


def _is_count(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 1


def _strings(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) and normalize(x) for x in v)


def validate_check(check: Any, where: str | None) -> None:
    """Refuse a ``check`` that :func:`run_check` cannot run (or that every answer would pass), naming
    the row and the fix."""
    example = '"check": {"type": "contains", "value": "Paris"}'
    if check is None:
        raise EdgetuneError("Regression rows need a 'check' (how an answer passes).", where=where,
                            fix=f"add e.g. {example}; types: {', '.join(CHECKS)} (see edgetune/resources/regression/README.md)")
    if not isinstance(check, dict) or check.get("type") not in CHECKS:
        got = check.get("type") if isinstance(check, dict) else check
        raise EdgetuneError(f"'check' must be an object with type one of {', '.join(CHECKS)} (got {got!r}).", where=where,
                            fix=f"e.g. {example}")
    kind, value = check["type"], check.get("value")
    unknown = sorted(set(check) - (_CHECK_KEYS if kind == "json_keys" else _CHECK_KEYS - {"exact"}))
    if unknown:
        raise EdgetuneError(f"Unknown key(s) {', '.join(unknown)} in a {kind} check.", where=where,
                            fix='a check has "type" and "value" ("exact" for json_keys only)')
    need = CHECK_VALUES[kind]
    if not need:
        if "value" in check:
            raise EdgetuneError(f"A {kind} check takes no value.", where=where, fix=f'write {{"type": "{kind}"}}')
        return
    ok = {
        "contains": lambda v: isinstance(v, str) and bool(normalize(v)),
        "exact": lambda v: isinstance(v, str) and bool(normalize(v)),
        "starts_with": lambda v: isinstance(v, str) and bool(v.strip()),
        "contains_all": _strings,
        "any_of": _strings,
        "regex": lambda v: isinstance(v, str) and bool(v),
        "number": _is_number,
        "max_words": _is_count,
        "lines": _is_count,
        "json_keys": lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
        "json_equals": lambda v: "value" in check,
        "csv": lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) and x.strip() for x in v),
        "all": lambda v: isinstance(v, list) and bool(v),
        "any": lambda v: isinstance(v, list) and bool(v),
    }[kind]
    if not ok(value):
        raise EdgetuneError(f"Bad value {value!r} for a {kind} check: it needs {need}.", where=where,
                            fix="a value of that form (a string that is only punctuation would match every answer)")
    if kind == "json_keys" and not isinstance(check.get("exact", False), bool):
        raise EdgetuneError("json_keys' \"exact\" is true or false.", where=where)
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise EdgetuneError(f"Invalid regex in check: {exc}", where=where, fix="fix the pattern (Python re syntax)") from None
    if kind in ("all", "any"):
        for sub in value:
            validate_check(sub, where)


_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
_FENCED = re.compile(r"^```[\w-]*\s*\n(.*?)\n?```$", re.DOTALL)


def _unfence(text: str) -> str:
    """The answer without one surrounding Markdown code fence (as the JSON checks tolerate)."""
    s = text.strip()
    m = _FENCED.match(s)
    return m.group(1).strip() if m else s


def is_refusal(text: str) -> bool:
    return _REFUSAL_RE.search(text or "") is not None


def run_check(output: str, check: dict) -> float:
    """1.0 when ``output`` passes ``check``, else 0.0 (see :data:`CHECK_VALUES`)."""
    kind, value = check["type"], check.get("value")
    text = output or ""
    if kind == "contains":
        return float(normalize(str(value)) in normalize(text))
    if kind == "contains_all":
        return float(all(normalize(str(v)) in normalize(text) for v in value))
    if kind == "any_of":
        return float(any(normalize(str(v)) in normalize(text) for v in value))
    if kind == "regex":
        return float(re.search(value, text, flags=re.IGNORECASE | re.DOTALL) is not None)
    if kind == "exact":
        return float(normalize(text) == normalize(str(value)))
    if kind == "starts_with":
        v = str(value).strip()  # a word must end where the value does: "The" does not start "There"
        return float(re.match(re.escape(v) + (r"(?!\w)" if v[-1].isalnum() else ""),
                              text.lstrip(" \t\r\n\"'*_#`>"), flags=re.IGNORECASE) is not None)
    if kind == "json_valid":
        return float(parse_json(text)[0])
    if kind == "json_keys":
        ok, obj = parse_json(text)
        if not ok or not isinstance(obj, dict):
            return 0.0
        return float(set(obj) == set(value) if check.get("exact") else set(value) <= set(obj))
    if kind == "json_equals":
        ok, obj = parse_json(text)
        return float(ok and _same_json(obj, value))
    if kind == "number":
        nums = [n.replace(",", "") for n in _NUMBER.findall(text)]
        try:
            return float(bool(nums) and float(nums[-1]) == float(str(value).replace(",", "")))
        except ValueError:
            return 0.0
    if kind == "refusal":
        return float(is_refusal(text))
    if kind == "not_refusal":
        return float(bool(text.strip()) and not is_refusal(text))
    if kind == "max_words":
        return float(0 < len(text.split()) <= int(value))
    if kind == "lines":
        return float(sum(1 for line in text.splitlines() if line.strip()) == int(value))
    if kind == "csv":
        return float(_csv_ok(text, value))
    if kind == "all":
        return float(all(run_check(text, c) for c in value))
    if kind == "any":
        return float(any(run_check(text, c) for c in value))
    raise EdgetuneError(f"Unknown check type {kind!r}.")


def _same_json(a: Any, b: Any) -> bool:
    """JSON equality where 1 == 1.0 but true != 1 (Python's == says True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _csv_ok(text: str, header: list[str]) -> bool:
    """CSV whose first row is ``header`` (case and spaces around fields ignored), followed by at
    least one row, every row with as many fields."""
    import csv

    lines = [line for line in _unfence(text).splitlines() if line.strip()]
    try:
        rows = list(csv.reader(lines))
    except csv.Error:
        return False
    want = [h.strip().lower() for h in header]
    return (len(rows) >= 2 and [c.strip().lower() for c in rows[0]] == want
            and all(len(r) == len(want) for r in rows[1:]))


@dataclass
class Pair:
    """A held-out preference row: prompt turns, the preferred answer and the rejected one."""

    id: str
    messages: list[dict]
    chosen: str
    rejected: str


def load_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """Preference rows (``prompt`` as a string or turns, ``chosen``, ``rejected``) from a file/folder."""
    from ..data.formats import normalise
    from ..data.load import iter_source, list_sources
    from ..data.problems import Problem

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
