"""``edgetune data from-logs LOG… -o DIR``: served traffic back into training data.

Reads the team server's feedback log (``kind: feedback``) and shadow log (``kind: shadow``) — only
lines that carry text, i.e. written with ``log_text`` on — and writes

* ``DIR/sft.jsonl`` — chat rows: a user's correction as the answer; an answer rated up as it was;
* ``DIR/pairs.jsonl`` — preference pairs: correction > the original answer; on shadow records with a
  ``reference``, the side whose answer passes the reference check > the side that fails it; on shadow
  records with a ``preferred`` verdict (``primary``/``candidate``, e.g. from a judge), that side > the other;
* ``DIR/data_card.json`` — how many rows came from which signal, what was dropped and why.

On the way: PII is redacted as ``data prepare --redact-pii`` does it (:func:`edgetune.data.clean.redact_pii`:
e-mails, phones, cards, SSNs, IPs become typed placeholders), exact duplicates are dropped, and with
``--run RUN`` every row whose prompt is also a prompt of that run's held-out splits (valid/test) is
dropped, so the next training cannot learn the evaluation (the CLI finds those split files; this module
takes them as paths). A line that does not parse is skipped,
counted, and named by file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from ..errors import EdgetuneError

SHOWN_BAD = 20


def redact(text: str, counts: Counter) -> str:
    from .clean import redact_pii

    return redact_pii(text, counts)


def _redact_messages(msgs: list, counts: Counter) -> list[dict]:
    out = []
    for m in msgs:
        m = dict(m)
        if isinstance(m.get("content"), str):
            m["content"] = redact(m["content"], counts)
        out.append(m)
    return out


def _prompt_key(msgs: list[dict]) -> str:
    """The user side of a conversation, normalised: what 'the same prompt' means for the overlap check."""
    text = "\n".join(" ".join(str(m.get("content") or "").lower().split()) for m in msgs if m.get("role") == "user")
    return hashlib.sha256(text.encode()).hexdigest()


def _held_out_prompts(files: list[Path]) -> set[str]:
    keys: set[str] = set()
    for p in files:
        if not p.is_file():
            continue
        for line in Path(p).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            msgs = row.get("messages") or ([{"role": "user", "content": row["prompt"]}] if isinstance(row.get("prompt"), str)
                                           else row.get("prompt") or [])
            if msgs:
                keys.add(_prompt_key(msgs))
    if not keys:
        raise EdgetuneError("No held-out split to check against.", where=", ".join(str(p) for p in files),
                            fix="point --run at a run folder whose data stage ran (RUN/data/valid.jsonl, test.jsonl)")
    return keys


def from_logs(logs: list[Path], out_dir: Path, *, held_out: list[Path] | None = None) -> dict:
    """Build the SFT rows, preference pairs and data card from ``logs``; ``held_out``: split files
    (JSONL) whose prompts must not come back as training rows. Returns the card."""
    from ..eval.metrics import passes_reference
    from ..io import write_json, write_jsonl

    held = _held_out_prompts([Path(p) for p in held_out]) if held_out else set()
    signals: Counter = Counter()
    dropped: Counter = Counter()
    pii: Counter = Counter()
    bad: list[str] = []
    sft: dict[str, dict] = {}
    pairs: dict[str, dict] = {}
    read = 0

    def keep(rows: dict, row: dict, msgs: list, signal: str) -> None:
        if held and _prompt_key(msgs) in held:
            dropped["overlaps_held_out"] += 1
            return
        key = hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if key in rows:
            dropped["duplicate"] += 1
            return
        rows[key] = row
        signals[signal] += 1

    for log in logs:
        log = Path(log)
        if not log.is_file():
            raise EdgetuneError(f"Log not found: {log}", where=str(log), exit_code=2,
                                fix="pass the team server's feedback.jsonl / shadow.jsonl")
        with open(log, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                read += 1
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    bad.append(f"{log}:{i}: {exc}")
                    continue
                kind = rec.get("kind")
                if kind == "feedback":
                    msgs, answer, fix = rec.get("messages"), rec.get("answer"), rec.get("correction")
                    if not isinstance(msgs, list) or not msgs:
                        dropped["feedback_without_text"] += 1
                        continue
                    msgs = _redact_messages(msgs, pii)
                    answer = redact(answer, pii) if isinstance(answer, str) else None
                    if isinstance(fix, str) and fix.strip():
                        fix = redact(fix, pii)
                        keep(sft, {"messages": msgs + [{"role": "assistant", "content": fix}]}, msgs, "correction")
                        if answer and answer.strip() != fix.strip():
                            keep(pairs, {"prompt": msgs, "chosen": fix, "rejected": answer}, msgs, "correction_over_original")
                    elif rec.get("rating") == "up" and answer and answer.strip():
                        keep(sft, {"messages": msgs + [{"role": "assistant", "content": answer}]}, msgs, "thumbs_up")
                    else:
                        dropped["thumbs_down_without_correction" if rec.get("rating") == "down" else "no_answer"] += 1
                elif kind == "shadow":
                    msgs = rec.get("messages")
                    p, c = rec.get("primary") or {}, rec.get("candidate") or {}
                    if not isinstance(msgs, list) or not msgs or "text" not in p or "text" not in c:
                        dropped["shadow_without_text"] += 1
                        continue
                    msgs = _redact_messages(msgs, pii)
                    texts = {"primary": redact(p["text"] or "", pii), "candidate": redact(c["text"] or "", pii)}
                    winner = rec.get("preferred") if rec.get("preferred") in texts else None
                    signal = "judge_preferred"
                    if winner is None and isinstance(rec.get("reference"), str):
                        ok = {s: passes_reference(t, rec["reference"]) for s, t in texts.items()}
                        winner = next((s for s in ok if ok[s] and not ok[_other(s)]), None)
                        signal = "reference_check"
                    if winner is None or texts[winner].strip() == texts[_other(winner)].strip():
                        dropped["shadow_without_a_preference"] += 1
                        continue
                    keep(pairs, {"prompt": msgs, "chosen": texts[winner], "rejected": texts[_other(winner)]}, msgs, signal)
                else:
                    dropped[f"kind_{kind or 'missing'}"] += 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "sft.jsonl", list(sft.values()))
    write_jsonl(out_dir / "pairs.jsonl", list(pairs.values()))
    card = {"logs": [str(p) for p in logs], "lines_read": read, "sft_rows": len(sft), "preference_pairs": len(pairs),
            "by_signal": dict(sorted(signals.items())), "dropped": dict(sorted(dropped.items())),
            "pii_redacted": dict(sorted(pii.items())), "unreadable_lines": len(bad), "unreadable": bad[:SHOWN_BAD],
            "held_out_checked": [str(p) for p in held_out or []],
            "outputs": {"sft": str(out_dir / "sft.jsonl"), "pairs": str(out_dir / "pairs.jsonl")}}
    write_json(out_dir / "data_card.json", card)
    return card


def _other(side: str) -> str:
    return "candidate" if side == "primary" else "primary"
