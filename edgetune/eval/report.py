"""report.json (everything), report.md (tables people read), report.html (the same, with charts).

Charts are matplotlib PNGs embedded as base64 so the HTML is one self-contained file that can be
attached to a CI run or mailed around.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from ..io import write_json, write_text
from .gates import describe
from .metrics import DIRECTION

# Metrics that are fractions in [0, 1] and read best as percentages.
PERCENT = {"exact_match", "contains", "regex", "json_valid", "json_schema", "json_fields", "accuracy", "macro_f1",
           "pass_rate", "top1_agreement", "judge_win_rate", "extra_fields_rate", "reasoning_rate"}


def _base(metric: str) -> str:
    return metric.split(".")[-1] if metric.split(".")[0] in ("regression", "per_field", "per_category", "think_off") else metric


def fmt(metric: str, v: Any) -> str:
    if v is None:
        return "–"
    if not isinstance(v, (int, float)):
        return str(v)
    leaf = metric.split(".")[-1]
    if leaf in PERCENT or metric.startswith(("per_field.", "per_category.", "regression.per_category.")):
        return f"{100 * v:.1f}%"
    if leaf in ("ttft_s", "latency_s", "latency_p95_s"):
        return f"{v:.3f}s"
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"


# Column headers for terminal tables (80 columns): the report files keep the full metric names.
SHORT = {"json_fields": "fields", "json_valid": "json", "exact_match": "exact", "tokens_per_s": "tok/s",
         "regression.pass_rate": "regression", "preference.accuracy": "pref acc", "ttft_s": "ttft", "macro_f1": "F1", "rouge_l": "ROUGE-L",
         "accuracy": "acc", "reasoning_chars": "reasoning"}


def short_name(metric: str) -> str:
    if metric.startswith("think_off."):  # the task set again with thinking off
        return short_name(metric.removeprefix("think_off.")) + " (off)"
    if metric in SHORT:
        return SHORT[metric]
    return metric.split(".", 1)[1] if metric.startswith("per_field.") else metric


def fmt_delta(metric: str, d: float | None) -> str:
    if d is None:
        return "–"
    leaf = metric.split(".")[-1]
    good = DIRECTION.get(leaf, 1) * d
    mark = " ▲" if good > 1e-9 else (" ▼" if good < -1e-9 else "")
    if leaf in PERCENT or metric.startswith(("per_field.", "per_category.", "regression.per_category.")):
        return f"{100 * d:+.1f} pp{mark}"
    return f"{d:+.3f}{mark}"


def metric_order(report: dict) -> list[str]:
    """Headline first, then task metrics, per-field, latency, then the regression set."""
    keys: list[str] = []
    for m in report["models"]:
        for k in m["metrics"]:
            if k not in keys:
                keys.append(k)
    head = report.get("headline")

    def rank(k: str) -> tuple:
        leaf = k.split(".")[-1]
        return (
            k != head,
            k.startswith("regression."),
            k.startswith("think_off."),
            k.startswith("per_field.") or k.startswith("per_category."),
            leaf in ("ttft_s", "latency_s", "latency_p95_s", "tokens_per_s"),
            leaf in ("nll", "perplexity"),
        )

    return sorted(keys, key=rank)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|").replace("\n", " ⏎ ") for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _clip(s: str, n: int = 160) -> str:
    s = s or ""
    return s if len(s) <= n else s[: n - 1] + "…"


REG_CAT = "regression.per_category."


def regression_by_category(report: dict) -> str:
    """The regression set's pass rate per category: one row per category (and one for all), the
    baseline's column, then each other model's with its change vs the baseline. '' without one."""
    models, base = report["models"], report["baseline"]
    cats: list[str] = []
    for m in models:
        cats += [k.removeprefix(REG_CAT) for k in m["metrics"] if k.startswith(REG_CAT) and k.removeprefix(REG_CAT) not in cats]
    if not cats:
        return ""
    info = report.get("regression") or {}
    counts = info.get("n_per_category") or {}
    if not counts:
        for r in report.get("examples", {}).get("regression", []):
            counts[r.get("category")] = counts.get(r.get("category"), 0) + 1
    order = [m for m in models if m["name"] == base] + [m for m in models if m["name"] != base]
    header = ["category", "n"] + [m["name"] + (" (baseline)" if m["name"] == base else "") for m in order]
    rows = []
    for cat, key in [(c, REG_CAT + c) for c in sorted(cats)] + [("**all**", "regression.pass_rate")]:
        n = sum(counts.values()) if key == "regression.pass_rate" else counts.get(cat)
        row = [cat, str(n) if n else "–"]
        for m in order:
            cell = fmt(key, m["metrics"].get(key))
            d = report.get("deltas", {}).get(m["name"], {}).get(key)
            row.append(cell if m["name"] == base or d is None else f"{cell} ({fmt_delta(key, d)})")
        rows.append(row)
    srcs = info.get("sources")
    note = ("Share of each category's answers that pass their checks"
            + (f" (sets: {', '.join(f'`{s}`' for s in srcs)})" if srcs else "") + "."
            + (f" In brackets: the change vs {base} (▲ better, ▼ worse)." if len(order) > 1 else ""))
    return note + "\n\n" + _md_table(header, rows)


def worst_examples(report: dict, set_name: str = "task", n: int = 5) -> list[dict]:
    """Examples where the non-baseline models do worst on the headline metric (ties: lowest mean)."""
    rows = report["examples"].get(set_name, [])
    metric = report["headline"] if set_name in ("task", "think_off") else "pass_rate"
    base = report["baseline"]
    others = [m["name"] for m in report["models"] if m["name"] != base] or [base]

    def score(r):
        vals = [r["outputs"][n_]["scores"].get(metric) for n_ in others if n_ in r["outputs"]]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else 1.0

    ranked = sorted(rows, key=score)
    return [r for r in ranked if score(r) < 1.0][:n]


def to_markdown(report: dict, worst: int = 5) -> str:
    models = report["models"]
    names = [m["name"] for m in models]
    base = report["baseline"]
    out = ["# edgetune eval report", ""]
    out.append(f"Data: `{report['data']}` · {report['n_examples'].get('task', 0)} task examples"
               + (f" · {report['n_examples']['regression']} regression examples" if "regression" in report["n_examples"] else "")
               + f" · baseline: **{base}** · headline metric: **{report['headline']}** · {report['seconds']}s")
    out.append("")
    out.append(_md_table(["model", "spec"], [[m["name"], f"`{m['spec']}`"] for m in models]))
    if report.get("runner_choice"):
        rc = report["runner_choice"]
        out += ["", f"Runner for the run's models: **{rc['runner']}**" + (f" ({rc['gguf_type']} GGUF)" if rc.get("gguf_type") else "")
                + f" — {rc['reason']}."]
    out += ["", "## Metrics", ""]
    by_cat = regression_by_category(report)
    # the regression set's categories get their own table below
    keys = [k for k in metric_order(report) if not (by_cat and k.startswith(REG_CAT))]
    out.append(_md_table(["metric"] + names, [[k] + [fmt(k, m["metrics"].get(k)) for m in models] for k in keys]))
    if report.get("preference"):
        pr = report["preference"]
        out += ["", f"`preference.accuracy`: how often a model's log-prob of the chosen answer (summed over its tokens) is "
                    f"above the rejected one's, on {pr['n_pairs']} pairs of `{pr['data']}`; `preference.margin`: the mean "
                    "difference in nats."
                + (f" Not measured for {', '.join(pr['no_logits'])} (no logits over HTTP)." if pr.get("no_logits") else "")]
    if report.get("deltas"):
        out += ["", f"## Change vs {base}", "", "▲ better, ▼ worse (in each metric's own direction).", ""]
        dn = list(report["deltas"])
        out.append(_md_table(["metric"] + dn, [[k] + [fmt_delta(k, report["deltas"][d].get(k)) for d in dn] for k in keys]))
    if by_cat:
        out += ["", "## Regression set by category", "", by_cat]
    if report.get("drift"):
        out += ["", f"## Drift vs {report['drift']['reference']} (teacher-forced over the references)", ""]
        rows = [[n, str(d["tokens"]), f"{d['kl']:.4f}", f"{100 * d['top1_agreement']:.1f}%", f"{d['kl_p95_example']:.4f}"]
                for n, d in report["drift"]["candidates"].items()]
        out.append(_md_table(["candidate", "tokens", "mean KL (nats)", "top-1 agreement", "KL p95 (per example)"], rows))
    if report.get("judge"):
        out += ["", f"## LLM judge (pairwise vs {base}, both orders)", ""]
        rows = [[n, str(j["wins"]), str(j["ties"]), str(j["losses"]), fmt("judge_win_rate", j["win_rate"])]
                for n, j in report["judge"].items() if isinstance(j, dict) and "wins" in j]
        out.append(_md_table(["model", "wins", "ties", "losses", "win rate"], rows))
    gates = report.get("gates") or {}
    if gates.get("checks"):
        out += ["", "## Gates", ""]
        out.append("**PASSED**" if gates["passed"] else "**FAILED**")
        out.append("")
        out += [f"- {'✅' if c['passed'] else '❌'} {describe(c)}" for c in gates["checks"]]
    for set_name in report["examples"]:
        ws = worst_examples(report, set_name, worst)
        if not ws:
            continue
        metric = report["headline"] if set_name in ("task", "think_off") else "pass_rate"
        out += ["", f"## Worst {set_name} examples ({metric})", ""]
        for r in ws:
            out.append(f"### {r['id']}" + (f" ({r['category']})" if r.get("category") else ""))
            out.append("")
            out.append(f"**Prompt:** {_clip(r['prompt'], 300)}")
            out.append("")
            rows = [["reference", _clip(r["reference"]), ""]]
            for n in names:
                o = r["outputs"].get(n, {})
                rows.append([n, _clip(o.get("output", "")), fmt(metric, o.get("scores", {}).get(metric))])
            out.append(_md_table(["", "output", metric], rows))
            out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------- charts


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def charts(report: dict) -> dict[str, str]:
    """name -> base64 PNG: quality metrics per model, latency, drift."""
    return {name: _png(fig) for name, fig in chart_figures(report).items()}


def chart_figures(report: dict) -> dict:
    """name -> matplotlib Figure for :func:`charts`. Every figure uses constrained layout, which
    places the figure title, the subplot titles and the tick labels so that none overlaps another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = report["models"]
    names = [m["name"] for m in models]
    out: dict = {}
    quality = [k for k in metric_order(report) if k.split(".")[-1] in PERCENT and not k.startswith("per_")
               and ".per_" not in k]
    if quality:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(quality) * len(names) / 2 + 3), 3.6), layout="constrained")
        x = np.arange(len(quality))
        w = 0.8 / len(names)
        for i, m in enumerate(models):
            vals = [100 * (m["metrics"].get(k) or 0) for k in quality]
            bars = ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=m["name"])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(x, quality, rotation=20, ha="right")
        ax.set_ylabel("%")
        ax.set_ylim(0, 110)
        ax.legend(fontsize=8)
        ax.set_title("Quality metrics per model")
        out["quality"] = fig
    lat = [(k, lab) for k, lab in (("ttft_s", "time to first token (s)"), ("latency_s", "median latency (s)"),
                                   ("tokens_per_s", "decode tokens/s")) if any(k in m["metrics"] for m in models)]
    if lat:
        fig, axes = plt.subplots(1, len(lat), figsize=(4 * len(lat), 3.2), layout="constrained")
        axes = np.atleast_1d(axes)
        for ax, (k, lab) in zip(axes, lat, strict=False):
            ax.bar(names, [m["metrics"].get(k) or 0 for m in models], color="tab:gray")
            ax.set_title(lab, fontsize=9)
            ax.tick_params(axis="x", rotation=20, labelsize=8)
        fig.suptitle("Latency (task set)")
        out["latency"] = fig
    if report.get("drift"):
        c = report["drift"]["candidates"]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), layout="constrained")
        axes[0].bar(list(c), [d["kl"] for d in c.values()], color="tab:red")
        axes[0].set_title("mean KL vs reference (nats)", fontsize=9)
        axes[1].bar(list(c), [100 * d["top1_agreement"] for d in c.values()], color="tab:green")
        axes[1].set_title("top-1 agreement (%)", fontsize=9)
        axes[1].set_ylim(0, 100)
        fig.suptitle(f"Drift vs {report['drift']['reference']}")
        out["drift"] = fig
    return out


def to_html(report: dict, worst: int = 5) -> str:
    md = to_markdown(report, worst)
    imgs = "".join(f'<h2>{html.escape(k)}</h2><img alt="{html.escape(k)} chart" src="data:image/png;base64,{v}">'
                   for k, v in charts(report).items())
    body = _md_to_html(md)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;"
             "vertical-align:top}th{background:#f3f3f3}code{background:#f6f6f6;padding:0 3px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>edgetune eval report</title>"
            f"<style>{style}</style></head><body>{imgs and '<h1>Charts</h1>' + imgs}{body}</body></html>\n")


def _inline(s: str) -> str:
    import re

    s = html.escape(s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def _md_to_html(md: str) -> str:
    """The small Markdown subset :func:`to_markdown` writes (headings, tables, bullets, paragraphs)."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip().replace("\\|", "|") for c in r.strip("|").split(" | ")] for r in rows if not r.startswith("|---")]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
                       + "</table>")
            continue
        elif line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def write_report(report: dict, out_dir: Path, worst: int = 5) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json(paths["json"], report)
    write_text(paths["md"], to_markdown(report, worst))
    write_text(paths["html"], to_html(report, worst))
    return paths
