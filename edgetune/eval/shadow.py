"""``edgetune eval shadow LOG.jsonl``: turn a team server's shadow log into a comparison report.

Each ``kind: shadow`` record holds the primary's and the candidate's answer to one real request
(see README "Serving for a team"). The report gives how often they agree, latency and token
counts for each, the task metrics where a record carries a ``reference``, and — when a judge is
named and the log carries the prompts (``log_text: true``) — the pairwise judge's verdicts.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from ..errors import EdgetuneError
from ..io import write_json, write_text
from . import metrics as M
from .data import Example


def read_shadow_log(path: str | Path, route: str | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise EdgetuneError(f"Shadow log not found: {path}", where=str(path), fix="serve with log.shadow_log set", exit_code=2)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EdgetuneError(f"Line {i} is not JSON ({exc.msg}).", where=f"{path}:{i}",
                                    fix="the log is JSONL written by edgetune serve; remove the broken line") from None
            if rec.get("kind") != "shadow" or (route and rec.get("route") != route):
                continue
            for side in ("primary", "candidate"):
                if not isinstance(rec.get(side), dict) or "model" not in rec[side]:
                    raise EdgetuneError(f"Line {i}: shadow record without {side}.model.", where=f"{path}:{i}")
            rows.append(rec)
    if not rows:
        raise EdgetuneError(f"No shadow records{f' for route {route!r}' if route else ''} in {path}.", where=str(path),
                            fix="send traffic to a shadow route (primary + shadow) first")
    return rows


def _side_stats(answers: list[dict]) -> dict:
    ok = [a for a in answers if "error" not in a]
    lat = [a["latency_ms"] for a in ok]
    return {"answers": len(ok), "errors": len(answers) - len(ok),
            "latency_ms_p50": M.percentile(lat, 50), "latency_ms_p95": M.percentile(lat, 95),
            "mean_completion_tokens": M.mean(a.get("completion_tokens") for a in ok),
            "mean_prompt_tokens": M.mean(a.get("prompt_tokens") for a in ok)}


def compare_shadow(path: str | Path, *, route: str | None = None, judge: str | None = None, cfg=None) -> dict:
    """The comparison report (a dict) for the shadow records in ``path``."""
    rows = read_shadow_log(path, route)
    pairs = [r for r in rows if "error" not in r["candidate"] and "error" not in r["primary"]]
    primary = sorted({r["primary"]["model"] for r in rows})
    cand = sorted({r["candidate"]["model"] for r in rows})
    exact = [float(M.normalize(r["primary"].get("text", "")) == M.normalize(r["candidate"].get("text", ""))) for r in pairs]
    rouge = [M.rouge_l(r["candidate"].get("text", ""), r["primary"].get("text", "")) for r in pairs]
    report: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "log": str(path), "routes": sorted({r["route"] for r in rows}),
        "primary": primary, "candidate": cand, "records": len(rows), "compared": len(pairs),
        "agreement": {"exact_match": M.mean(exact), "rouge_l": M.mean(rouge)},
        "sides": {"primary": _side_stats([r["primary"] for r in rows]), "candidate": _side_stats([r["candidate"] for r in rows])},
    }
    refd = [r for r in pairs if isinstance(r.get("reference"), str)]
    if refd:
        mets = M.choose_metrics([r["reference"] for r in refd])
        mets = [m for m in mets if m in M.SCORERS or m in ("json_valid", "json_fields")]
        task = {}
        for side in ("primary", "candidate"):
            scores = [M.score_example(r[side].get("text", ""), r["reference"], mets) for r in refd]
            task[side] = {m: M.mean(s.get(m) for s in scores) for m in mets}
        report["task"] = {"with_reference": len(refd), "metrics": mets, **task}
    if judge:
        with_prompt = [r for r in pairs if r.get("messages")]
        if not with_prompt:
            raise EdgetuneError("The judge needs the prompts, and this log has none.", where=str(path),
                                fix="serve with log.log_text: true (or --log-text) while shadowing, then judge")
        from .judge import judge_models

        examples = [Example(r["request_id"], r["messages"], r.get("reference") or "") for r in with_prompt]
        outputs = {"primary": [{"output": r["primary"].get("text", "")} for r in with_prompt],
                   "candidate": [{"output": r["candidate"].get("text", "")} for r in with_prompt]}
        report["judge"] = judge_models(judge, examples, outputs, "primary", cfg)
    return report


def _f(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def to_markdown(rep: dict) -> str:
    lines = [f"# Shadow comparison: {', '.join(rep['candidate'])} vs {', '.join(rep['primary'])}", "",
             f"Log `{rep['log']}`, routes {', '.join(rep['routes'])}: {rep['records']} records, {rep['compared']} compared.", "",
             f"Agreement: exact match {_f(rep['agreement']['exact_match'])}, ROUGE-L {_f(rep['agreement']['rouge_l'])}.", "",
             "| side | answers | errors | p50 ms | p95 ms | mean completion tokens |", "|---|---|---|---|---|---|"]
    for side, s in rep["sides"].items():
        lines.append(f"| {side} | {s['answers']} | {s['errors']} | {_f(s['latency_ms_p50'])} | {_f(s['latency_ms_p95'])} | "
                     f"{_f(s['mean_completion_tokens'])} |")
    if "task" in rep:
        t = rep["task"]
        lines += ["", f"Task metrics on {t['with_reference']} records with a reference:", "",
                  "| side | " + " | ".join(t["metrics"]) + " |", "|---" * (len(t["metrics"]) + 1) + "|"]
        lines += [f"| {side} | " + " | ".join(_f(t[side][m]) for m in t["metrics"]) + " |" for side in ("primary", "candidate")]
    if "judge" in rep and "candidate" in rep["judge"]:
        j = rep["judge"]["candidate"]
        lines += ["", f"Judge {rep['judge']['judge']}: candidate wins {j['wins']}, ties {j['ties']}, losses {j['losses']} "
                      f"(win rate {_f(j['win_rate'])})."]
    return "\n".join(lines) + "\n"


def write_shadow_report(rep: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"json": write_json(out / "shadow_report.json", rep), "md": write_text(out / "shadow_report.md", to_markdown(rep))}
