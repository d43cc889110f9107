"""Tool-call metrics: did the model call the right tools with the right arguments, and only when it
should?

An eval example with ``tools`` whose reference (last assistant turn) has ``tool_calls`` expects
those calls; one whose reference is a plain answer expects no call. Each runner returns the calls
it got (hf/mlx/gguf parse the generated text with the template's call syntax,
:func:`edgetune.toolcalls.parse_calls`; openai/ollama servers return them structured), and every
example is scored on the metrics that apply to it (``None`` elsewhere, so averages are over the
examples each metric is about):

* ``tool_call_accuracy``: a call was expected; the calls made are exactly the reference calls (same
  tool names, arguments equal as JSON: key order and number spelling do not matter, values do;
  parallel calls compared as a multiset, in any order).
* ``tool_name_accuracy``: a call was expected; the right tools were called (arguments ignored).
* ``tool_args_valid``: the model attempted a call; every call it wrote parsed, named a declared
  tool and had a JSON object as its arguments.
* ``tool_no_call_accuracy``: no call was expected; the model answered without attempting one.
"""

from __future__ import annotations

import json
from typing import Any

GROUP = "tool_calls"  # the metric name that selects all of TOOL_METRICS
TOOL_METRICS = ("tool_call_accuracy", "tool_name_accuracy", "tool_args_valid", "tool_no_call_accuracy")


def normalise_calls(calls: Any) -> list[dict]:
    """OpenAI / Ollama / parsed calls -> ``[{"name", "arguments"}]`` (arguments parsed when they are a
    JSON string; left as given otherwise, so an invalid string stays invalid)."""
    out = []
    for c in calls or []:
        fn = c.get("function", c) if isinstance(c, dict) else {}
        args = fn.get("arguments", fn.get("parameters"))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        out.append({"name": fn.get("name"), "arguments": args})
    return out


def _canon(v: Any) -> Any:
    """JSON value with integral floats as ints (3.0 == 3 as JSON numbers; true stays apart from 1)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_canon(x) for x in v]
    return v


def _key(call: dict) -> str:
    return json.dumps([call.get("name"), _canon(call.get("arguments"))], sort_keys=True, ensure_ascii=False)


def score_tools(calls: list[dict] | None, error: str | None, reference_calls: list[dict] | None) -> dict[str, float | None]:
    """Per-example tool scores of one generation (``calls``/``error`` as the runner returned them)."""
    made = normalise_calls(calls)
    want = normalise_calls(reference_calls)
    attempted = bool(made) or bool(error)
    scores: dict[str, float | None] = dict.fromkeys(TOOL_METRICS)
    if want:
        scores["tool_call_accuracy"] = float(error is None and sorted(map(_key, made)) == sorted(map(_key, want)))
        scores["tool_name_accuracy"] = float(error is None and sorted(str(c["name"]) for c in made) ==
                                             sorted(str(c["name"]) for c in want))
    else:
        scores["tool_no_call_accuracy"] = float(not attempted)
    if attempted:
        scores["tool_args_valid"] = float(error is None and all(isinstance(c["arguments"], dict) for c in made))
    return scores


def expand(metric_names: list[str]) -> list[str]:
    """``tool_calls`` in a metric list stands for every tool metric."""
    out = []
    for m in metric_names:
        for name in (TOOL_METRICS if m == GROUP else (m,)):
            if name not in out:
                out.append(name)
    return out
