"""Task metrics: per-example scores and their aggregates.

Every metric here scores one model output against one reference and returns a float in [0, 1]
(or ``None`` when it does not apply), so the report can average them, rank the worst examples
and compare models example by example. Corpus-level metrics that are not averages (macro-F1,
perplexity, latency percentiles) are computed in :func:`aggregate`.

ROUGE-L comes from ``rouge-score`` and chrF from ``sacrebleu``; JSON-schema validation from
``jsonschema``. Only the normalisation, the JSON field comparison and the classification
bookkeeping are written here, because no library scores "which fields of this JSON object match
the reference object" the way a structured-output task needs.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from .tools import GROUP as TOOL_GROUP
from .tools import TOOL_METRICS

# Direction of every metric edgetune reports: +1 higher is better, -1 lower is better.
# Gates and "deltas vs baseline" read this table to decide what counts as a regression.
DIRECTION: dict[str, int] = {
    "exact_match": 1,
    "contains": 1,
    "regex": 1,
    "rouge_l": 1,
    "chrf": 1,
    "json_valid": 1,
    "json_schema": 1,
    "json_fields": 1,
    "accuracy": 1,
    "macro_f1": 1,
    "pass_rate": 1,
    "nll": -1,
    "perplexity": -1,
    "ttft_s": -1,
    "latency_s": -1,
    "latency_p95_s": -1,
    "tokens_per_s": 1,
    "judge_win_rate": 1,
    "kl": -1,
    "top1_agreement": 1,
    "tool_call_accuracy": 1,
    "tool_name_accuracy": 1,
    "tool_args_valid": 1,
    "tool_no_call_accuracy": 1,
}

# Metrics scored per example from (output, reference); the value is what the report averages.
TEXT_METRICS = ("exact_match", "contains", "regex", "rouge_l", "chrf", "json_valid", "json_schema", "json_fields")
ALL_METRICS = TEXT_METRICS + ("accuracy", "macro_f1", "nll", "latency", "pass_rate", TOOL_GROUP) + TOOL_METRICS

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Case-, whitespace- and punctuation-insensitive form used by exact match and contains.

    NFKC folds full-width and ligature forms; punctuation is dropped so ``"Paris."`` matches
    ``"paris"`` (the usual SQuAD-style normalisation, without its English-only article removal).
    """
    text = unicodedata.normalize("NFKC", text or "").lower().translate(_PUNCT)
    return " ".join(text.split())


def exact_match(output: str, reference: str) -> float:
    return float(normalize(output) == normalize(reference))


def contains(output: str, reference: str) -> float:
    ref = normalize(reference)
    return float(bool(ref) and ref in normalize(output))


def regex_match(output: str, pattern: str) -> float:
    return float(re.search(pattern, output or "", flags=re.IGNORECASE | re.DOTALL) is not None)


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words)."""
    return float(_rouge_scorer().score(reference or "", output or "")["rougeL"].fmeasure)


_ROUGE = None


def _rouge_scorer():
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE


def chrf(output: str, reference: str) -> float:
    """Sentence chrF (sacrebleu, character 6-grams, beta 2) scaled to [0, 1]."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(output or "", [reference or ""]).score) / 100.0


# ---------------------------------------------------------------- JSON

_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def parse_json(text: str) -> tuple[bool, Any]:
    """Parse a model's JSON answer; a single surrounding Markdown code fence is tolerated.

    Anything else around the JSON (explanations, a second object) makes it invalid: a program
    consuming the output would fail on it too.
    """
    s = (text or "").strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1).strip()
    try:
        return True, json.loads(s)
    except (json.JSONDecodeError, ValueError):
        return False, None


def json_valid(output: str) -> float:
    return float(parse_json(output)[0])


def infer_schema(references: Iterable[Any]) -> dict | None:
    """A JSON schema every reference object satisfies: the keys they all share are required,
    each with the JSON type the references use. ``None`` when references are not all objects."""
    objs = list(references)
    if not objs or not all(isinstance(o, dict) for o in objs):
        return None
    required = set(objs[0])
    for o in objs[1:]:
        required &= set(o)
    props: dict[str, dict] = {}
    for key in sorted(required):
        types = sorted({_json_type(o[key]) for o in objs})
        props[key] = {"type": types[0] if len(types) == 1 else types}
    return {"type": "object", "properties": props, "required": sorted(required)}


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def json_schema_valid(output: str, schema: dict) -> float:
    import jsonschema

    ok, obj = parse_json(output)
    if not ok:
        return 0.0
    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError:
        return 0.0
    return 1.0


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2]}`` → ``{"a.b": 1, "c": [2]}`` (lists compare whole)."""
    if isinstance(obj, dict) and obj:
        flat: dict[str, Any] = {}
        for k, v in obj.items():
            flat.update(flatten(v, f"{prefix}{k}."))
        return flat
    return {prefix[:-1]: obj} if prefix else {"": obj}


def _same_value(got: Any, want: Any) -> bool:
    # Strings compare case- and space-insensitively (a label "Billing" is still billing);
    # everything else must have the same JSON type and value: "3" is not 3, true is not 1.
    if isinstance(want, str):
        return isinstance(got, str) and " ".join(got.lower().split()) == " ".join(want.lower().split())
    if _json_type(got) != _json_type(want) and not (
        _json_type(got) in ("integer", "number") and _json_type(want) in ("integer", "number")
    ):
        return False
    return got == want


def json_field_scores(output: str, reference: Any) -> dict[str, float]:
    """Per-field correctness (1/0) of the output object against the reference object.

    Fields are the reference's leaf paths; extra fields in the output are ignored here (they
    are counted by :func:`json_extra_fields`); invalid JSON or a non-object scores every field 0.
    """
    ref_flat = flatten(reference) if isinstance(reference, dict) else {"": reference}
    ok, obj = parse_json(output)
    if not ok:
        return dict.fromkeys(ref_flat, 0.0)
    got_flat = flatten(obj) if isinstance(obj, dict) else {"": obj}
    return {k: float(k in got_flat and _same_value(got_flat[k], v)) for k, v in ref_flat.items()}


def json_fields(output: str, reference: Any) -> float:
    scores = json_field_scores(output, reference)
    return sum(scores.values()) / len(scores) if scores else 0.0


def json_extra_fields(output: str, reference: Any) -> int:
    ok, obj = parse_json(output)
    if not ok or not isinstance(obj, dict) or not isinstance(reference, dict):
        return 0
    return len(set(flatten(obj)) - set(flatten(reference)))


# ---------------------------------------------------------------- classification


def predict_label(output: str, labels: list[str]) -> str | None:
    """Map a free-text output onto one of ``labels``: exact (normalised) match first, else the
    only label that appears as a whole word; ``None`` when none or several do."""
    norm = normalize(output)
    by_norm = {normalize(lab): lab for lab in labels}
    if norm in by_norm:
        return by_norm[norm]
    hits = [lab for n, lab in by_norm.items() if n and re.search(rf"(?<!\w){re.escape(n)}(?!\w)", norm)]
    return hits[0] if len(hits) == 1 else None


def classification(predictions: list[str | None], references: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over the reference label set (a ``None`` prediction is wrong for
    every class: it costs recall but adds no false positive)."""
    n = len(references)
    if n == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    acc = sum(p == r for p, r in zip(predictions, references, strict=True)) / n
    f1s = []
    for lab in sorted(set(references)):
        tp = sum(p == lab and r == lab for p, r in zip(predictions, references, strict=True))
        fp = sum(p == lab and r != lab for p, r in zip(predictions, references, strict=True))
        fn = sum(p != lab and r == lab for p, r in zip(predictions, references, strict=True))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s)}


def looks_like_labels(references: list[str], max_labels: int = 20) -> bool:
    """References are class labels when they are short, few and repeated."""
    refs = [r.strip() for r in references]
    if len(refs) < 4 or any(len(r.split()) > 3 or not r for r in refs):
        return False
    distinct = len(set(refs))
    return distinct <= max_labels and distinct <= len(refs) / 2


# ---------------------------------------------------------------- choosing metrics


def choose_metrics(references: list[str]) -> list[str]:
    """Metrics that fit the references when the user names none."""
    parsed = [parse_json(r) for r in references]
    if references and all(ok and isinstance(obj, dict) for ok, obj in parsed):
        return ["json_fields", "json_valid", "json_schema", "exact_match"]
    if looks_like_labels(references):
        return ["accuracy", "macro_f1", "exact_match"]
    return ["exact_match", "contains", "rouge_l", "chrf"]


def headline(metrics: list[str]) -> str:
    """The one number a report leads with."""
    for m in ("tool_call_accuracy", "json_fields", "accuracy", "pass_rate", "rouge_l", "exact_match"):
        if m in metrics:
            return m
    return metrics[0] if metrics else "exact_match"


SCORERS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "rouge_l": rouge_l,
    "chrf": chrf,
}


def score_example(output: str, reference: str, metrics: list[str], *, schema: dict | None = None,
                  regex: str | None = None) -> dict[str, float]:
    """Per-example scores for the text metrics in ``metrics``."""
    scores: dict[str, float] = {}
    for m in metrics:
        if m in SCORERS:
            scores[m] = SCORERS[m](output, reference)
        elif m == "regex":
            if regex:
                scores[m] = regex_match(output, regex)
        elif m == "json_valid":
            scores[m] = json_valid(output)
        elif m == "json_schema":
            if schema is not None:
                scores[m] = json_schema_valid(output, schema)
        elif m == "json_fields":
            ok, ref_obj = parse_json(reference)
            scores[m] = json_fields(output, ref_obj if ok else reference)
    return scores


# ---------------------------------------------------------------- aggregates


def mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), without importing numpy."""
    vals = sorted(values)
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def latency_summary(gens: list[dict]) -> dict[str, float | None]:
    """TTFT and decode speed over generations (dicts with ttft_s, total_s, completion_tokens).

    tokens/s is decode throughput: generated tokens after the first over the time after the
    first token, summed over examples, so long answers weigh by their length. Rows generated in
    one batch share its time (each carries the batch's time and ``batch``), so batched and
    one-by-one runners report the same kind of figure: tokens the runner produced per second.
    """
    ttfts = [g["ttft_s"] for g in gens if g.get("ttft_s") is not None]
    totals = [g["total_s"] for g in gens if g.get("total_s") is not None]
    dec_tokens = sum(max(g.get("completion_tokens", 0) - 1, 0) for g in gens if g.get("ttft_s") is not None)
    dec_time = sum((g["total_s"] - g["ttft_s"]) / max(g.get("batch") or 1, 1) for g in gens if g.get("ttft_s") is not None)
    return {
        "ttft_s": statistics.median(ttfts) if ttfts else None,
        "latency_s": statistics.median(totals) if totals else None,
        "latency_p95_s": percentile(totals, 95),
        "tokens_per_s": dec_tokens / dec_time if dec_time > 0 and dec_tokens else None,
    }


def nll_summary(pairs: list[tuple[float, int]]) -> dict[str, float | None]:
    """Mean NLL per reference token and perplexity from per-example (sum NLL, token count)."""
    total = sum(s for s, _ in pairs)
    n = sum(c for _, c in pairs)
    if n == 0:
        return {"nll": None, "perplexity": None}
    m = total / n
    return {"nll": m, "perplexity": math.exp(min(m, 50.0))}


def label_counts(labels: Iterable[str]) -> Counter:
    return Counter(labels)


def passes_reference(output: str, reference: str) -> bool:
    """A pass/fail check of one answer against its reference: the metrics the reference calls for
    (:func:`choose_metrics`), mean score at least 0.5 (the team server's canary and ``data from-logs``)."""
    mets = [m for m in choose_metrics([reference]) if m in SCORERS or m in ("json_valid", "json_fields")]
    scores = score_example(output, reference, mets)
    vals = [v for v in scores.values() if isinstance(v, int | float)]
    return bool(vals) and sum(vals) / len(vals) >= 0.5
