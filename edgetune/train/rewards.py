"""Reward functions for GRPO: parse ``--reward`` specs, check the data has what they need, score completions.

GRPO samples several completions per prompt and scores each one with every reward; a completion's
reward is the weighted sum. Rewards are given as repeatable ``--reward SPEC`` flags (in a recipe, a
list of the same strings), e.g. ``--reward json_fields:1.0 --reward length:0.1``.

Spec grammar
------------
``NAME[=ARG][:WEIGHT]`` for a built-in, ``MODULE:FUNC[:WEIGHT]`` or ``PATH/TO/FILE.py:FUNC[:WEIGHT]``
for a function of your own. The weight is the last ``:``-separated part only when it is a decimal
number (``1``, ``0.5``, ``-2``, ``1e-3``): ``regex=a:b`` is the pattern ``a:b`` with weight 1.0, and
``regex=x:2:1`` the pattern ``x:2`` with weight 1. The weight defaults to 1.0 and may be negative.
``ARG`` is everything after the first ``=``.
A built-in's name wins over a module of the same name (give such a module as ``path/to/file.py:FUNC``).
Duplicate labels get suffixes: two ``regex=...`` rewards are logged as ``regex`` and ``regex_2``.

Built-ins (each a plain ``(completion, reference) -> float``, named like the eval metrics of
:mod:`edgetune.eval.metrics` and scored by its functions):

* ``json_valid``: 1 when the completion parses as JSON (one surrounding Markdown fence allowed), else 0.
* ``json_fields`` (needs a reference, a JSON value): the fraction of the reference's leaf fields the
  completion's JSON matches (:func:`edgetune.eval.metrics.json_fields`); unparseable output scores 0.
* ``exact`` (needs a reference): 1 when the completion equals the reference after the eval
  normalisation (case, whitespace, punctuation; :func:`edgetune.eval.metrics.exact_match`).
* ``regex=PATTERN``: 1 when PATTERN matches anywhere in the completion (case-insensitive, ``.`` matches
  newlines, as the eval ``regex`` metric).
* ``number[=TOL]`` (needs a reference holding a number): 1 when the last number in the completion equals
  the last number in the reference, ``math.isclose(got, want, rel_tol=TOL, abs_tol=TOL)``, TOL default
  1e-6; a completion without a number scores 0. Thousands separators (``1,234``) and exponents are read.
* ``tool_call`` (needs a reference): when the reference makes tool calls, 1 when the completion makes
  exactly those calls (names and arguments, any order; :func:`edgetune.eval.tools.score_tools`'s
  ``tool_call_accuracy``); when the reference is a plain answer, 1 when the completion makes no call
  (``tool_no_call_accuracy``). Calls are read from text in any syntax :mod:`edgetune.toolcalls` knows
  (Hermes ``<tool_call>``, Mistral ``[TOOL_CALLS]``, Llama 3 JSON) or from JSON: a call object
  ``{"name", "arguments"|"parameters"}``, a list of them, OpenAI ``{"function": ...}`` entries, or
  ``{"tool_calls": [...]}``.
* ``length[=N]``: a length penalty over characters (the completion's ``len()``; N default 512):
  ``0`` when ``len <= N``, else ``-min(1, (len - N) / N)``: linear from 0 at N chars to -1 at 2N and
  beyond. Give it a small weight (``length:0.1``).

A reference is missing when it is ``None`` or blank; :func:`check_references` stops a run before
any model loads when a reward that needs one meets such rows (or a reference it cannot use).

User functions
--------------
``MODULE:FUNC`` imports ``MODULE`` (the current directory is on the path for this import);
``FILE.py:FUNC`` loads that file. The function is called in batch form, with keyword arguments::

    def score(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]

one float per completion, in order (``prompts[i]`` is the prompt completion ``i`` answers, so each
prompt repeats once per sample). A function taking ``**kwargs`` (``def score(completions, **kw)``)
works too. NaN, infinity, ``None`` or a wrong number of values is an error naming the function.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgetuneError
from ..eval import metrics
from ..eval.tools import normalise_calls, score_tools

BatchFn = Callable[[list[str], list[str], list[str | None]], Any]
RowFn = Callable[[str, str | None], float]

DEFAULT_LENGTH = 512  # characters
DEFAULT_NUMBER_TOL = 1e-6

USER_FORM = "MODULE:FUNC or path/to/file.py:FUNC, called as FUNC(prompts=, completions=, references=) -> list[float]"
SIGNATURE = "def FUNC(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]"


@dataclass(frozen=True)
class Reward:
    """One parsed ``--reward`` spec.

    ``fn(prompts, completions, references)`` returns one value per completion (for a user function,
    whatever it returned: :func:`score` checks it). ``name`` is the built-in's name or ``MODULE:FUNC`` /
    ``path/to/file.py:FUNC``; ``label`` is the metric name it is logged under.
    """

    name: str
    weight: float
    needs_reference: bool
    fn: BatchFn
    arg: str | None = None  # a built-in's =ARG, as written
    spec: str = ""  # the spec as given, for messages
    index: int = 1  # 2, 3, ... for the second, third reward with the same base label
    # reference -> None when usable, else why not (checked before any model loads)
    check_reference: Callable[[str], str | None] | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        base = self.name
        if ":" in base and ("/" in base or os.sep in base):  # path/to/file.py:score -> file.py:score
            path, _, func = base.rpartition(":")
            base = f"{Path(path).name}:{func}"
        return base if self.index == 1 else f"{base}_{self.index}"

    @property
    def is_builtin(self) -> bool:
        return self.name in BUILTINS


class _RowFailed(Exception):
    """A built-in failed on completion ``index`` (carried to :func:`score`, which names its prompt)."""

    def __init__(self, index: int, exc: BaseException):
        super().__init__(f"row {index}: {exc}")
        self.index = index
        self.exc = exc


# ---------------------------------------------------------------- built-ins


def _require(reference: str | None) -> str:
    if reference is None or not reference.strip():
        raise ValueError("this reward needs a reference and the row has none")
    return reference


def _json_valid(completion: str, reference: str | None) -> float:
    return metrics.json_valid(completion)


def _json_fields(completion: str, reference: str | None) -> float:
    # score_example parses the reference as the eval does (a non-JSON reference is compared as a string)
    return metrics.score_example(completion or "", _require(reference), ["json_fields"])["json_fields"]


def _json_reference_problem(reference: str) -> str | None:
    return None if metrics.parse_json(reference)[0] else "the reference is not JSON"


def _exact(completion: str, reference: str | None) -> float:
    return metrics.exact_match(completion or "", _require(reference))


# a number not glued to a word on its left ("x2" is not 2); thousands separators and exponents read
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def last_number(text: str | None) -> float | None:
    """The last number written in ``text`` (``None`` when there is none)."""
    found = _NUMBER.findall((text or "").replace("\u2212", "-"))  # U+2212 MINUS SIGN
    for s in reversed(found):
        try:
            value = float(s.replace(",", ""))
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return None


def _number_reference_problem(reference: str) -> str | None:
    return None if last_number(reference) is not None else "the reference holds no number"


def _number(tol: float) -> RowFn:
    def number(completion: str, reference: str | None) -> float:
        want = last_number(_require(reference))
        if want is None:
            raise ValueError(f"the reference holds no number: {_short(reference)}")
        got = last_number(completion)
        return float(got is not None and math.isclose(got, want, rel_tol=tol, abs_tol=tol))

    return number


def _regex(pattern: str) -> RowFn:
    def regex(completion: str, reference: str | None) -> float:
        return metrics.regex_match(completion or "", pattern)

    return regex


def _length(limit: int) -> RowFn:
    def length(completion: str, reference: str | None) -> float:
        n = len(completion or "")
        return 0.0 if n <= limit else -min(1.0, (n - limit) / limit)

    return length


def _is_call(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    if isinstance(obj.get("function"), dict):
        return True
    return isinstance(obj.get("name"), str) and ("arguments" in obj or "parameters" in obj)


def read_calls(text: str | None) -> tuple[list[dict], str | None, bool]:
    """Tool calls written in ``text``: ``(calls, error, attempted)``.

    JSON (fenced or not) counts as calls when it is call-shaped (see the module docstring) and as a
    plain answer otherwise; other text is tried against every call syntax of :mod:`edgetune.toolcalls`,
    the first syntax that sees a call started wins. Never raises on model output.
    """
    from ..toolcalls import SYNTAXES, parse_calls

    ok, obj = metrics.parse_json(text or "")
    if ok:
        if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
            obj = obj["tool_calls"]
        if isinstance(obj, list) and obj and all(_is_call(c) for c in obj):
            return normalise_calls(obj), None, True
        if _is_call(obj):
            return normalise_calls([obj]), None, True
        return [], None, False
    for syntax in SYNTAXES:
        parsed = parse_calls(text or "", syntax)
        if parsed.attempted:
            return parsed.calls, parsed.error, True
    return [], None, False


def _reference_calls(reference: str) -> list[dict]:
    calls, error, _ = read_calls(reference)
    if error:
        raise ValueError(f"the reference's tool call is malformed: {error}")
    return calls


def _tool_reference_problem(reference: str) -> str | None:
    error = read_calls(reference)[1]
    return f"the reference's tool call is malformed ({error})" if error else None


def _tool_call(completion: str, reference: str | None) -> float:
    want = _reference_calls(_require(reference))
    calls, error, _ = read_calls(completion)
    scores = score_tools(calls, error, want)
    value = scores["tool_call_accuracy"] if want else scores["tool_no_call_accuracy"]
    return float(value or 0.0)


@dataclass(frozen=True)
class _Builtin:
    make: Callable[[str | None, str], RowFn]  # (arg, spec) -> row function; raises EdgetuneError on a bad arg
    needs_reference: bool
    usage: str
    check_reference: Callable[[str], str | None] | None = None


def _no_arg(fn: RowFn, name: str) -> Callable[[str | None, str], RowFn]:
    def make(arg: str | None, spec: str) -> RowFn:
        if arg is not None:
            raise EdgetuneError(f"The reward '{name}' takes no argument (got '={arg}').", where=f"reward {spec}",
                                fix=f"write it as {name} or {name}:WEIGHT")
        return fn

    return make


def _make_regex(arg: str | None, spec: str) -> RowFn:
    if not arg:
        raise EdgetuneError("The reward 'regex' needs a pattern.", where=f"reward {spec}",
                            fix="write it as regex=PATTERN, e.g. regex=^\\d+$")
    try:
        re.compile(arg, flags=re.IGNORECASE | re.DOTALL)
    except re.error as exc:
        raise EdgetuneError(f"The pattern of the reward '{spec}' does not compile: {exc}.", where=f"reward {spec}",
                            fix="fix the regular expression (Python re syntax)") from exc
    return _regex(arg)


def _make_number(arg: str | None, spec: str) -> RowFn:
    if arg is None:
        return _number(DEFAULT_NUMBER_TOL)
    try:
        tol = float(arg)
    except ValueError:
        tol = -1.0
    if not (math.isfinite(tol) and tol >= 0):
        raise EdgetuneError(f"The tolerance of the reward 'number' must be a number >= 0, not '{arg}'.",
                            where=f"reward {spec}", fix="write it as number or number=0.01 (relative tolerance)")
    return _number(tol)


def _make_length(arg: str | None, spec: str) -> RowFn:
    if arg is None:
        return _length(DEFAULT_LENGTH)
    try:
        limit = int(arg)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise EdgetuneError(f"The limit of the reward 'length' must be a whole number of characters > 0, not '{arg}'.",
                            where=f"reward {spec}", fix=f"write it as length or length=N (default {DEFAULT_LENGTH})")
    return _length(limit)


BUILTINS: dict[str, _Builtin] = {
    "json_valid": _Builtin(_no_arg(_json_valid, "json_valid"), False, "json_valid"),
    "json_fields": _Builtin(_no_arg(_json_fields, "json_fields"), True, "json_fields", _json_reference_problem),
    "exact": _Builtin(_no_arg(_exact, "exact"), True, "exact"),
    "regex": _Builtin(_make_regex, False, "regex=PATTERN"),
    "number": _Builtin(_make_number, True, "number[=TOL]", _number_reference_problem),
    "tool_call": _Builtin(_no_arg(_tool_call, "tool_call"), True, "tool_call", _tool_reference_problem),
    "length": _Builtin(_make_length, False, "length[=N]"),
}


def _batch(row: RowFn) -> BatchFn:
    """Per-example built-in -> batch form; a failure carries the index of the row that failed."""

    def batch(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
        out = []
        for i, (completion, reference) in enumerate(zip(completions, references, strict=True)):
            try:
                out.append(row(completion, reference))
            except Exception as exc:
                raise _RowFailed(i, exc) from exc
        return out

    return batch


# ---------------------------------------------------------------- parsing


def _builtins_list() -> str:
    return ", ".join(b.usage for b in BUILTINS.values())


def _unknown(spec: str, name: str, why: str) -> EdgetuneError:
    close = difflib.get_close_matches(name, list(BUILTINS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return EdgetuneError(
        f"Unknown reward '{name}': {why}.", where=f"reward {spec}",
        fix=f"{hint}use a built-in ({_builtins_list()}) or your own function as {USER_FORM}")


_WEIGHT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _split_weight(spec: str) -> tuple[str, float]:
    # only a decimal literal is a weight: a function may well be called `nan` or `inf`
    body, sep, last = spec.rpartition(":")
    if sep and _WEIGHT.fullmatch(last.strip()):
        weight = float(last)
        if math.isfinite(weight):
            return body, weight
        raise EdgetuneError(f"The weight of the reward '{spec}' is too large ({last}).", where=f"reward {spec}",
                            fix="write the weight as a plain number, e.g. json_fields:0.5")
    return spec, 1.0


def _import_module(module: str, spec: str):
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise _unknown(spec, module, f"it is not a built-in and no module '{module}' can be imported "
                           f"(from {cwd} or the Python path)") from exc
        raise EdgetuneError(f"Importing the reward module '{module}' failed: {exc}.", where=f"reward {spec}",
                            fix=f"install the module it needs ('{exc.name}') or fix its import") from exc
    except Exception as exc:
        raise EdgetuneError(f"Importing the reward module '{module}' failed: {type(exc).__name__}: {exc}.",
                            where=f"reward {spec}", fix="fix the error in that module") from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _load_file(path: str, spec: str):
    file = Path(path).expanduser()
    if not file.is_file():
        raise EdgetuneError(f"The reward file '{path}' does not exist.", where=f"reward {spec}",
                            fix=f"give the path of a Python file (relative to {os.getcwd()}) as {USER_FORM}")
    resolved = file.resolve()
    mod_name = f"_edgetune_reward_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise EdgetuneError(f"The reward file '{path}' cannot be loaded as Python.", where=f"reward {spec}",
                            fix="give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise EdgetuneError(f"Loading the reward file '{path}' failed: {type(exc).__name__}: {exc}.",
                            where=f"reward {spec}", fix="fix the error in that file") from exc
    return module


def _user_function(target: str, func: str, spec: str) -> BatchFn:
    module = _load_file(target, spec) if target.endswith(".py") else _import_module(target, spec)
    fn = getattr(module, func, None)
    if fn is None:
        raise EdgetuneError(f"'{target}' has no function '{func}'.", where=f"reward {spec}",
                            fix=f"define it there: {SIGNATURE}")
    if not callable(fn):
        raise EdgetuneError(f"'{target}:{func}' is a {type(fn).__name__}, not a function.", where=f"reward {spec}",
                            fix=f"make it a function: {SIGNATURE}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None  # not introspectable (a C function): find out when it is called
    if sig is not None:
        try:
            sig.bind(prompts=[], completions=[], references=[])
        except TypeError as exc:
            raise EdgetuneError(
                f"The reward function '{target}:{func}{sig}' cannot be called with the keyword arguments "
                f"prompts=, completions=, references= ({exc}).", where=f"reward {spec}",
                fix=f"give it this signature: {SIGNATURE} (or take **kwargs)") from exc

    def call(prompts: list[str], completions: list[str], references: list[str | None]) -> Any:
        return fn(prompts=prompts, completions=completions, references=references)

    return call


def parse_reward(spec: str) -> Reward:
    """One spec (see the module docstring) -> :class:`Reward` (its label not yet made unique)."""
    if not isinstance(spec, str):
        raise EdgetuneError(f"A reward spec must be a string, not {type(spec).__name__} ({spec!r}).",
                            where="reward", fix="write rewards as strings, e.g. json_fields:1.0")
    text = spec.strip()
    if not text:
        raise EdgetuneError("A reward spec is empty.", where="reward",
                            fix=f"name a reward: {_builtins_list()}, or {USER_FORM}")
    body, weight = _split_weight(text)
    name, eq, arg = body.partition("=")
    if name in BUILTINS:
        builtin = BUILTINS[name]
        row = builtin.make(arg if eq else None, text)
        return Reward(name, weight, builtin.needs_reference, _batch(row), arg if eq else None, text,
                      check_reference=builtin.check_reference)
    head, sep, last = text.rpartition(":")
    if head in BUILTINS:  # json_fields:abc (a built-in's name wins over a module of the same name)
        raise EdgetuneError(f"The weight of the reward '{text}' must be a number, not '{last}'.",
                            where=f"reward {text}", fix=f"write it as {head}:0.5 (or {head} for weight 1)")
    target, sep, func = body.rpartition(":")
    if not sep or not target or not func:
        raise _unknown(text, body, "it is not a built-in, and a function of your own is written MODULE:FUNC")
    if not func.isidentifier():
        raise _unknown(text, body, f"'{func}' is not a Python function name")
    return Reward(body, weight, False, _user_function(target, func, text), None, text)


def parse_rewards(specs: Sequence[str] | str) -> list[Reward]:
    """``--reward`` specs (or a recipe's list of them) -> rewards, labels made unique (``regex``, ``regex_2``)."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise EdgetuneError(
            "GRPO needs at least one reward to score completions.", where="rewards",
            fix=f"add one or more, e.g. --reward json_valid --reward length:0.1; built-ins: {_builtins_list()}; "
                f"or your own function as {USER_FORM}")
    out: list[Reward] = []
    seen: set[str] = set()
    for spec in specs:
        reward = parse_reward(spec)
        index = 1
        while reward.label in seen:
            index += 1
            reward = dataclasses.replace(reward, index=index)
        seen.add(reward.label)
        out.append(reward)
    return out


# ---------------------------------------------------------------- checking and scoring


def _short(text: Any, limit: int = 80) -> str:
    s = " ".join(str(text).split())
    return repr(s if len(s) <= limit else s[: limit - 1] + "…")


def _missing(reference: str | None) -> bool:
    return reference is None or not str(reference).strip()


def check_references(rewards: Sequence[Reward], references: Sequence[str | None], where: str) -> None:
    """Stop before any model loads when a reward that needs a reference meets rows without one
    (``None`` or blank) or with one it cannot use (``number``: no number in it; ``json_fields``: not
    JSON; ``tool_call``: a malformed call). ``where`` names the data (a file); rows count from 1."""
    n = len(references)
    needing = [r for r in rewards if r.needs_reference]
    if not needing or not n:
        return
    missing = [i for i, ref in enumerate(references) if _missing(ref)]
    if missing:
        labels = ", ".join(r.label for r in needing)
        specs = " / ".join(f"--reward {r.spec or r.name}" for r in needing)
        word = "reward" if len(needing) == 1 else "rewards"
        raise EdgetuneError(
            f"{len(missing)} of {n} rows have no reference, which the {word} {labels} "
            f"{'needs' if len(needing) == 1 else 'need'} (first: row {missing[0] + 1}).",
            where=f"{where}, row {missing[0] + 1}",
            fix=f"add a reference to every row (in chat rows the last assistant turn is the reference) or drop {specs}")
    for reward in needing:
        if reward.check_reference is None:
            continue
        bad = [(i, why) for i, ref in enumerate(references) if (why := reward.check_reference(str(ref)))]
        if bad:
            i, why = bad[0]
            raise EdgetuneError(
                f"{len(bad)} of {n} rows have a reference the reward {reward.label} cannot use: {why} "
                f"(first: row {i + 1}, {_short(references[i])}).",
                where=f"{where}, row {i + 1}",
                fix=f"fix those references or drop --reward {reward.spec or reward.name}")


def _as_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or value is None:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "__float__"):  # a 0-d numpy array or torch tensor
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def _values(reward: Reward, result: Any, prompts: Sequence[str]) -> np.ndarray:
    n = len(prompts)
    kind = "reward function" if not reward.is_builtin else "reward"
    fix = f"return one finite float per completion, in order: {SIGNATURE}"
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
        raise EdgetuneError(f"The {kind} {reward.name} returned a {type(result).__name__}, not a list of {n} floats.",
                            where=f"reward {reward.spec or reward.name}", fix=fix)
    items = list(result)
    if len(items) != n:
        raise EdgetuneError(f"The {kind} {reward.name} returned {len(items)} values for {n} completions.",
                            where=f"reward {reward.spec or reward.name}", fix=fix)
    out = np.empty(n, dtype=np.float64)
    for i, item in enumerate(items):
        value = _as_float(item)
        if value is None or not math.isfinite(value):
            what = f"the non-numeric value {item!r}" if value is None else f"{value}"
            raise EdgetuneError(
                f"The {kind} {reward.name} returned {what} at index {i} (prompt {_short(prompts[i])}).",
                where=f"reward {reward.spec or reward.name}", fix=fix)
        out[i] = value
    return out


def score(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str],
          references: Sequence[str | None]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Score ``completions`` (``prompts[i]`` / ``references[i]`` belong to completion ``i``).

    Returns the weighted sum per completion (float64, length n) and each reward's raw values by label.
    """
    n = len(completions)
    if len(prompts) != n or len(references) != n:
        raise ValueError(f"score() needs one prompt and one reference per completion: "
                         f"{len(prompts)} prompts, {n} completions, {len(references)} references")
    prompts, completions, references = list(prompts), list(completions), list(references)
    total = np.zeros(n, dtype=np.float64)
    raw: dict[str, np.ndarray] = {}
    for reward in rewards:
        where = f"reward {reward.spec or reward.name}"
        try:
            result = reward.fn(prompts, completions, references)
        except _RowFailed as exc:
            raise EdgetuneError(
                f"The reward {reward.label} failed on the completion for prompt {_short(prompts[exc.index])}: "
                f"{type(exc.exc).__name__}: {exc.exc}.", where=where,
                fix=f"check that row's reference, or drop {where.replace('reward ', '--reward ', 1)}") from exc.exc
        except EdgetuneError:
            raise
        except Exception as exc:
            first = f" (batch starting with prompt {_short(prompts[0])})" if prompts else ""
            raise EdgetuneError(
                f"The reward function {reward.name} raised {type(exc).__name__}: {exc}{first}.", where=where,
                fix=f"fix the function; it is called as {SIGNATURE}") from exc
        values = _values(reward, result, prompts)
        raw[reward.label] = values
        total += reward.weight * values
    return total, raw
