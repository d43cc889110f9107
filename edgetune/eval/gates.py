"""CI gates: ``--min METRIC=VALUE``, ``--max METRIC=VALUE`` and ``--max-regression METRIC=DELTA``.

``--min`` (higher is better: ``json_fields``) and ``--max`` (lower is better: ``nll``, ``latency_p95_s``)
apply to every model except the baseline (to the only model when there is one): a base model is not
expected to pass the bar the tuned model must clear. ``--max-regression``
bounds how much worse than the baseline a model may be, in the metric's own direction
(:data:`edgetune.eval.metrics.DIRECTION`): for ``nll`` or ``latency_s`` "worse" means higher.
A metric a model does not have fails its gate, so a typo cannot pass silently.
"""

from __future__ import annotations

from ..errors import EdgetuneError
from .metrics import DIRECTION


def parse_gate_args(items: tuple[str, ...] | list[str], flag: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or ():
        metric, sep, value = item.partition("=")
        if not sep or not metric.strip():
            raise EdgetuneError(f"{flag} {item!r} is not METRIC=VALUE.", fix=f"e.g. {flag} json_fields=0.8")
        try:
            out[metric.strip()] = float(value)
        except ValueError:
            raise EdgetuneError(f"{flag} {item!r}: {value!r} is not a number.", fix=f"e.g. {flag} json_fields=0.8") from None
    return out


def direction(metric: str) -> int:
    return DIRECTION.get(metric.split(".")[-1], DIRECTION.get(metric, 1))


def check_gates(models: list[dict], base_name: str, mins: dict[str, float], max_regression: dict[str, float],
                maxs: dict[str, float] | None = None) -> dict:
    checks: list[dict] = []
    targets = [m for m in models if m["name"] != base_name] or models
    base = next((m for m in models if m["name"] == base_name), models[0])
    for m in targets:
        for metric, lo in (mins or {}).items():
            v = m["metrics"].get(metric)
            checks.append({"gate": "min", "model": m["name"], "metric": metric, "value": v, "threshold": lo,
                           "passed": v is not None and v >= lo})
        for metric, hi in (maxs or {}).items():
            v = m["metrics"].get(metric)
            checks.append({"gate": "max", "model": m["name"], "metric": metric, "value": v, "threshold": hi,
                           "passed": v is not None and v <= hi})
    for m in (x for x in models if x["name"] != base_name):
        for metric, delta in (max_regression or {}).items():
            v, b = m["metrics"].get(metric), base["metrics"].get(metric)
            drop = None if v is None or b is None else direction(metric) * (b - v)
            checks.append({"gate": "max_regression", "model": m["name"], "metric": metric, "value": v, "baseline": b,
                           "drop": drop, "threshold": delta, "passed": drop is not None and drop <= delta + 1e-12})
    failures = [c for c in checks if not c["passed"]]
    return {"passed": not failures, "checks": checks, "failures": failures}


def describe(check: dict) -> str:
    v = "missing" if check["value"] is None else f"{check['value']:.4g}"
    if check["gate"] == "min":
        return f"{check['model']}: {check['metric']} = {v}, required >= {check['threshold']:.4g}"
    if check["gate"] == "max":
        return f"{check['model']}: {check['metric']} = {v}, required <= {check['threshold']:.4g}"
    b = "missing" if check.get("baseline") is None else f"{check['baseline']:.4g}"
    d = "n/a" if check.get("drop") is None else f"{check['drop']:.4g}"
    return (f"{check['model']}: {check['metric']} = {v} vs baseline {b} (worse by {d}), "
            f"allowed regression {check['threshold']:.4g}")
