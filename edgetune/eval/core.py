"""``evaluate()``: several models, the same examples, one report.

Models are run one after another (each is loaded, runs every set, and is freed before the
next), so two 7B models never sit in memory together. Per-example outputs and scores are kept
for the side-by-side "worst examples" and for the judge; aggregates go into each model's flat
``metrics`` dict (task metrics by name, regression metrics as ``regression.<metric>``).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import EvalConfig
from ..console import console, progress
from ..errors import EdgetuneError
from . import metrics as M
from .data import Example, Pair, load_examples, load_pairs, load_regression, run_check
from .runner_args import gen_params, runner_options
from .runners import GenParams, Runner, make_runner, parse_spec
from .tools import GROUP as TOOL_GROUP
from .tools import TOOL_METRICS, expand, score_tools


def resolve_metrics(cfg: EvalConfig, examples: list[Example]) -> list[str]:
    if cfg.metrics:
        chosen = list(cfg.metrics)
    elif any(e.tools or e.reference_calls for e in examples):
        chosen = [TOOL_GROUP]  # tool-use examples: did it call the right tools, and only when it should
    else:
        chosen = M.choose_metrics([e.reference for e in examples])
    chosen = expand(chosen)
    unknown = [m for m in chosen if m not in M.ALL_METRICS]
    if unknown:
        raise EdgetuneError(f"Unknown metric(s): {', '.join(unknown)}.", fix=f"choose from: {', '.join(M.ALL_METRICS)}")
    if "regex" in chosen and not cfg.regex:
        raise EdgetuneError("The regex metric needs a pattern.", fix="pass --regex PATTERN (or eval.regex in the recipe)")
    if any(e.check for e in examples) and "pass_rate" not in chosen:
        chosen.append("pass_rate")
    if cfg.nll and "nll" not in chosen:
        chosen.append("nll")
    if "latency" not in chosen:
        chosen.append("latency")
    return chosen


def load_schema(cfg: EvalConfig, examples: list[Example]) -> dict | None:
    if cfg.schema:
        from ..io import read_json

        return read_json(cfg.schema)
    refs = [M.parse_json(e.reference) for e in examples]
    return M.infer_schema(obj for ok, obj in refs if ok) if all(ok for ok, _ in refs) else None


def run_set(runner: Runner, name: str, set_name: str, examples: list[Example], metric_names: list[str],
            params: GenParams, *, schema: dict | None, regex: str | None, labels: list[str] | None,
            batch_size: int = 1) -> dict:
    """Generate and score one model on one example set; returns per-example rows + aggregates."""
    rows: list[dict] = []
    nll_pairs: list[tuple[float, int]] = []
    want_nll = "nll" in metric_names and runner.supports_logits
    with progress(_TokS(), transient=False) as bar:
        task = bar.add_task(f"{name} · {set_name}", total=len(examples), tok_s=0.0)
        toks = secs = 0.0
        for start in range(0, len(examples), max(batch_size, 1)):
            chunk = examples[start : start + max(batch_size, 1)]
            tools = [e.tools for e in chunk] if any(e.tools for e in chunk) else None
            gens = runner.generate_batch([e.messages for e in chunk], params, tools=tools) if len(chunk) > 1 else \
                [runner.generate(chunk[0].messages, params, tools=chunk[0].tools)]
            for ex, gen in zip(chunk, gens, strict=True):
                row = _score_one(runner, ex, gen, metric_names, schema, regex, labels, want_nll, nll_pairs)
                rows.append(row)
                toks += gen.completion_tokens
                secs += gen.total_s / len(chunk)
                bar.update(task, advance=1, tok_s=toks / secs if secs else 0.0)
    agg = aggregate(rows, metric_names, examples, labels, nll_pairs if want_nll else None)
    if params.think is not None or any(r["gen"].get("reasoning") for r in rows):
        agg.update(reasoning_summary(rows))
    return {"rows": rows, "aggregate": agg}


def reasoning_summary(rows: list[dict]) -> dict[str, float]:
    """How much a thinking model reasoned: the share of answers with reasoning and its mean length
    (characters, over the answers that have it). The task metrics score the final answer only."""
    whys = [r["gen"].get("reasoning") or "" for r in rows]
    with_r = [len(w) for w in whys if w]
    return {"reasoning_rate": M.mean(float(bool(w)) for w in whys) or 0.0,
            "reasoning_chars": sum(with_r) / len(with_r) if with_r else 0.0}


def thinking_sets(cfg: EvalConfig, runner: Runner, sets_def: list[tuple]) -> list[tuple]:
    """The sets one runner runs, with each set's thinking setting (``eval.thinking``): ``both`` runs
    the task set with thinking on and again as ``think_off``; ``auto`` is ``both`` for a template
    with a thinking switch and the template's default otherwise. The regression set's short answers
    run with thinking off where the template can turn it off."""
    from dataclasses import replace

    t = runner.thinking
    switch = t is not None and t.switch
    mode = cfg.thinking if cfg.thinking != "auto" else ("both" if switch else "default")
    out = []
    for name, exs, mets, params, labs in sets_def:
        if name == "task":
            think = {"on": True, "both": True, "off": False}.get(mode)
            out.append((name, exs, mets, replace(params, think=think), labs))
            if mode == "both":
                out.append(("think_off", exs, mets, replace(params, think=False), labs))
        elif switch:
            out.append((name, exs, mets, replace(params, think=False), labs))
        else:
            out.append((name, exs, mets, params, labs))
    return out


def _score_one(runner, ex, gen, metric_names, schema, regex, labels, want_nll, nll_pairs) -> dict:
    """Scores (and reference NLL) of one generation against its example."""
    scores = M.score_example(gen.text, ex.reference, metric_names, schema=schema, regex=regex)
    if ex.check:
        scores["pass_rate"] = run_check(gen.text, ex.check)
    if set(TOOL_METRICS) & set(metric_names):
        scores.update({k: v for k, v in score_tools(gen.tool_calls, gen.tool_error, ex.reference_calls).items()
                       if k in metric_names and v is not None})
    row = {"id": ex.id, "output": gen.text, "gen": gen.as_dict(), "scores": scores}
    if labels is not None:
        row["label"] = M.predict_label(gen.text, labels)
    if "json_fields" in metric_names:
        ok, ref = M.parse_json(ex.reference)
        row["fields"] = M.json_field_scores(gen.text, ref if ok else ex.reference)
        row["extra_fields"] = M.json_extra_fields(gen.text, ref if ok else None)
    if want_nll:
        s, n = runner.score(ex.messages, ex.reference)
        nll_pairs.append((s, n))
        row["nll"] = s / n if n else None
    return row


def preference_accuracy(runner: Runner, pairs: list[Pair], name: str) -> dict[str, float]:
    """How often the model ranks the chosen answer above the rejected one: the log-prob of each
    answer's tokens (end-of-turn included) summed given the prompt, as DPO's reward accuracy on a
    model with no reference. ``margin``: mean log-prob(chosen) - log-prob(rejected), in nats."""
    wins = margins = 0.0
    with progress(transient=False) as bar:
        task = bar.add_task(f"{name} · preference", total=len(pairs))
        for p in pairs:
            nll_c, _ = runner.score(p.messages, p.chosen)
            nll_r, _ = runner.score(p.messages, p.rejected)
            wins += float(nll_c < nll_r)
            margins += nll_r - nll_c
            bar.advance(task)
    return {"accuracy": wins / len(pairs), "margin": margins / len(pairs)}


def _TokS():
    from rich.progress import TextColumn

    return TextColumn("{task.fields[tok_s]:.1f} tok/s")


def aggregate(rows: list[dict], metric_names: list[str], examples: list[Example], labels: list[str] | None,
              nll_pairs: list[tuple[float, int]] | None) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for m in metric_names:
        if m in M.TEXT_METRICS or m == "pass_rate" or m in TOOL_METRICS:
            v = M.mean(r["scores"].get(m) for r in rows)
            if v is not None:
                agg[m] = v
    if labels is not None and ("accuracy" in metric_names or "macro_f1" in metric_names):
        agg.update(M.classification([r["label"] for r in rows], [e.reference.strip() for e in examples]))
    if nll_pairs is not None:
        agg.update({k: v for k, v in M.nll_summary(nll_pairs).items() if v is not None})
    if "latency" in metric_names:
        agg.update({k: v for k, v in M.latency_summary([r["gen"] for r in rows]).items() if v is not None})
    if rows and "fields" in rows[0]:
        keys = list(rows[0]["fields"])
        agg["per_field"] = {k: M.mean(r["fields"].get(k) for r in rows) for k in keys}
        agg["extra_fields_rate"] = M.mean(float(r.get("extra_fields", 0) > 0) for r in rows)
    cats = sorted({e.category for e in examples if e.category})
    if cats and any("pass_rate" in r["scores"] for r in rows):
        agg["per_category"] = {c: M.mean(r["scores"].get("pass_rate") for r, e in zip(rows, examples, strict=True) if e.category == c)
                               for c in cats}
    return agg


def flat_metrics(sets: dict[str, dict]) -> dict[str, float]:
    """One flat numeric dict per model: task metrics by name, other sets prefixed."""
    flat: dict[str, float] = {}
    for set_name, res in sets.items():
        prefix = "" if set_name == "task" else f"{set_name}."
        for k, v in res["aggregate"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[prefix + k] = v
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)):
                        flat[f"{prefix}{k}.{kk}"] = vv
    return flat


def resolve_baseline(baseline: str | None, models: list[dict]) -> str:
    if baseline is None:
        return models[0]["name"]
    for m in models:
        if baseline in (m["name"], m["spec"]):
            return m["name"]
    if baseline.isdigit() and int(baseline) < len(models):
        return models[int(baseline)]["name"]
    raise EdgetuneError(f"Baseline {baseline!r} is not one of the evaluated models.",
                        fix=f"use one of: {', '.join(m['name'] for m in models)}")


def evaluate(data_path, model_specs: list[str], out_dir, cfg: EvalConfig | None = None, baseline: str | None = None,
             *, write: bool = True, runner_choice: dict | None = None, train_data=None) -> dict:
    """Evaluate every model on the task set (and the regression set), write report.{json,md,html}.

    ``baseline`` (a model name or spec; default ``cfg.baseline`` or the first model) is what
    deltas and ``max_regression`` gates compare against. ``runner_choice`` (eval/fit.py: which runner
    a run's rows use and why) is recorded in the report. ``train_data``: the training split the eval
    data must be disjoint from (a user's own golden set; :mod:`edgetune.eval.overlap`). Returns the
    report dict; its ``gates.passed`` says whether every gate held.
    """
    from .gates import check_gates
    from .report import write_report

    cfg = cfg or EvalConfig()
    if not model_specs:
        raise EdgetuneError("No models to evaluate.", fix="pass --model SPEC (e.g. hf:models/base/x)")
    specs = [parse_spec(s) for s in model_specs]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EdgetuneError(f"Two models are both named {dupes[0]!r}.", fix="label them: --model base=hf:... --model tuned=hf:...")
    from .overlap import guard

    overlap = guard(data_path, train_data, allow=cfg.allow_overlap) if train_data else None
    examples = load_examples(data_path, cfg.limit)
    task_metrics = resolve_metrics(cfg, examples)
    schema = load_schema(cfg, examples) if ("json_schema" in task_metrics) else None
    labels = sorted({e.reference.strip() for e in examples}) if {"accuracy", "macro_f1"} & set(task_metrics) else None
    sets_def = [("task", examples, task_metrics, gen_params(cfg), labels)]
    reg = load_regression(cfg.regression)  # the shipped set and/or the user's files; [] when off
    if reg:
        reg_metrics = ["pass_rate"] + (["nll"] if cfg.nll else []) + ["latency"]
        sets_def.append(("regression", reg, reg_metrics, gen_params(cfg, min(cfg.max_tokens, cfg.regression_max_tokens)), None))

    pairs = load_pairs(cfg.preference_data, cfg.limit) if cfg.preference_data else []
    pref_skipped: list[str] = []

    t0 = time.time()
    models: list[dict] = []
    per_example: dict[str, dict[str, list[dict]]] = {s[0]: {} for s in sets_def}
    ran: dict[str, tuple] = {}  # every set some model ran (think_off only for thinking templates), in order
    for spec in specs:
        console.print(f"[bold]eval[/] loading {spec.name} ({spec.raw})")
        runner = make_runner(spec, **runner_options(cfg))
        try:
            results = {}
            for set_def in thinking_sets(cfg, runner, sets_def):
                set_name, exs, mets, params, labs = set_def
                ran.setdefault(set_name, set_def)
                per_example.setdefault(set_name, {})
                res = run_set(runner, spec.name, set_name, exs, mets, params, schema=schema, regex=cfg.regex, labels=labs,
                              batch_size=cfg.batch_size or runner.batch_size)
                results[set_name] = res
                per_example[set_name][spec.name] = res["rows"]
            if pairs:
                if runner.supports_logits:
                    results["preference"] = {"aggregate": preference_accuracy(runner, pairs, spec.name)}
                else:
                    pref_skipped.append(spec.name)
            models.append({"name": spec.name, "spec": spec.raw, "runner": runner.info(),
                           "metrics": flat_metrics(results),
                           "sets": {k: v["aggregate"] for k, v in results.items()}})
        finally:
            runner.close()
            del runner

    base_name = resolve_baseline(baseline or cfg.baseline, models)
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(data_path),
        "n_examples": {s[0]: len(s[1]) for s in ran.values()},
        "metrics": {s[0]: s[2] for s in ran.values()},
        "thinking": {s[0]: s[3].think for s in ran.values()},
        "headline": M.headline(task_metrics),
        "baseline": base_name,
        "config": {k: v for k, v in cfg.__dict__.items()},
        "models": models,
        "deltas": deltas(models, base_name),
        "examples": examples_table(list(ran.values()), per_example),
        "seconds": round(time.time() - t0, 1),
    }
    if runner_choice:
        report["runner_choice"] = runner_choice
    if reg:
        report["regression"] = regression_summary(cfg.regression, reg)
    if overlap is not None:
        report["overlap"] = overlap
    if pairs:
        report["n_examples"]["preference"] = len(pairs)
        report["preference"] = {"data": str(cfg.preference_data), "n_pairs": len(pairs),
                                "no_logits": pref_skipped}  # http runners (ollama, openai) cannot score
    if cfg.drift_reference:
        from .drift import drift_many

        report["drift"] = drift_many(specs, cfg.drift_reference, examples, cfg)
    if cfg.judge:
        from .judge import judge_models

        report["judge"] = judge_models(cfg.judge, examples, per_example["task"], base_name, cfg)
        for m in models:
            wr = report["judge"].get(m["name"], {}).get("win_rate")
            if wr is not None:
                m["metrics"]["judge_win_rate"] = wr
    report["gates"] = check_gates(models, base_name, cfg.gates, cfg.max_regression, cfg.max)
    if write:
        write_report(report, Path(out_dir), worst=cfg.worst)
    return report


def regression_summary(sources, reg: list[Example]) -> dict:
    """What the regression set was made of: its sources and rows per category."""
    from collections import Counter

    from .data import regression_sources

    return {"sources": regression_sources(sources),
            "n_per_category": dict(sorted(Counter(e.category or "uncategorised" for e in reg).items()))}


def deltas(models: list[dict], base_name: str) -> dict[str, dict[str, float]]:
    base = next(m for m in models if m["name"] == base_name)["metrics"]
    out = {}
    for m in models:
        if m["name"] == base_name:
            continue
        out[m["name"]] = {k: v - base[k] for k, v in m["metrics"].items() if k in base}
    return out


def examples_table(sets_def, per_example) -> dict[str, list[dict]]:
    """Per set: one row per example with every model's output and scores side by side."""
    table: dict[str, list[dict]] = {}
    for set_name, exs, _mets, _p, _l in sets_def:
        rows = []
        for i, ex in enumerate(exs):
            prompt = next((m["content"] for m in reversed(ex.messages) if m["role"] == "user"), "")
            rows.append({
                "id": ex.id, "category": ex.category, "prompt": prompt, "reference": ex.reference,
                "outputs": {name: {k: v for k, v in r[i].items() if k != "id"} for name, r in per_example.get(set_name, {}).items()},
            })
        table[set_name] = rows
    return table


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False, default=str)
