"""Optional LLM-as-judge: pairwise comparison against the baseline, asked in both orders.

LLM judges prefer whichever answer they read first (or second) more often than chance. Asking
each pair twice with the positions swapped and only counting a win when the two verdicts agree
cancels that bias: a judge that always answers "A" produces only ties. Off by default.
"""

from __future__ import annotations

import re

from ..config import EvalConfig
from ..console import progress
from .data import Example
from .runner_args import runner_options
from .runners import GenParams, Runner, make_runner

PROMPT = """You are an impartial judge comparing two answers to the same request.

Request:
{prompt}

Reference answer (may be empty):
{reference}

Answer A:
{a}

Answer B:
{b}

Which answer is better: more correct, more complete and closer to the reference? Reply with exactly one letter: A, B, or T for a tie."""

_VERDICT = re.compile(r"^\W*(A|B|T|tie)\b", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    m = _VERDICT.match(text or "")
    if not m:
        return None
    v = m.group(1).upper()
    return "T" if v == "TIE" else v


def judge_pair(judge: Runner, prompt: str, reference: str, cand: str, base: str) -> dict:
    """Both orders; returns the candidate's outcome (win / tie / loss) and the raw verdicts."""
    params = GenParams(max_tokens=4, temperature=0.0)
    v1 = parse_verdict(judge.generate([{"role": "user", "content": PROMPT.format(prompt=prompt, reference=reference, a=cand, b=base)}], params).text)
    v2 = parse_verdict(judge.generate([{"role": "user", "content": PROMPT.format(prompt=prompt, reference=reference, a=base, b=cand)}], params).text)
    # candidate's points in each order: win 1, tie or unparseable 0.5, loss 0
    p1 = {"A": 1.0, "B": 0.0}.get(v1, 0.5)
    p2 = {"B": 1.0, "A": 0.0}.get(v2, 0.5)
    score = (p1 + p2) / 2
    outcome = "win" if score > 0.5 else ("loss" if score < 0.5 else "tie")
    return {"outcome": outcome, "verdicts": [v1, v2]}


def judge_models(judge_spec: str | Runner, examples: list[Example], outputs: dict[str, list[dict]], base_name: str,
                 cfg: EvalConfig | None = None) -> dict:
    """Per non-baseline model: wins/ties/losses vs the baseline, win rate (ties count half),
    unparseable verdicts and how often the judge picked the first position."""
    judge = make_runner(judge_spec, **runner_options(cfg or EvalConfig())) if isinstance(judge_spec, str) else judge_spec
    res: dict = {"judge": judge.spec}
    try:
        base_rows = outputs[base_name]
        for name, rows in outputs.items():
            if name == base_name:
                continue
            counts = {"win": 0, "tie": 0, "loss": 0}
            invalid = first = total = 0
            with progress() as bar:
                task = bar.add_task(f"judge {name} vs {base_name}", total=len(examples))
                for ex, row, brow in zip(examples, rows, base_rows, strict=False):
                    prompt = next((m["content"] for m in reversed(ex.messages) if m["role"] == "user"), "")
                    r = judge_pair(judge, prompt, ex.reference, row["output"], brow["output"])
                    counts[r["outcome"]] += 1
                    invalid += sum(v is None for v in r["verdicts"])
                    first += (r["verdicts"][0] == "A") + (r["verdicts"][1] == "A")
                    total += 2
                    row.setdefault("judge", r)
                    bar.advance(task)
            n = max(len(examples), 1)
            res[name] = {"wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"],
                         "win_rate": (counts["win"] + 0.5 * counts["tie"]) / n, "invalid_verdicts": invalid,
                         "first_position_rate": first / total if total else None}
    finally:
        if isinstance(judge_spec, str):
            judge.close()
    return res
