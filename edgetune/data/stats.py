"""Token statistics with the model's tokenizer + chat template, and split-level helpers."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from .formats import Record

TOKENIZE_BATCH = 2048


def length_stats(lengths: Sequence[int]) -> dict:
    """count/min/p50/p95/p99/max/mean/total; nearest-rank percentiles so the numbers are exact ints."""
    if not lengths:
        return {"count": 0, "total": 0}
    s = sorted(lengths)
    n = len(s)

    def pct(q: float) -> int:
        return s[min(n - 1, max(0, -(-int(q * n * 100) // 100) - 1))]

    return {
        "count": n, "total": int(sum(s)), "min": s[0], "p50": pct(0.5), "p95": pct(0.95),
        "p99": pct(0.99), "max": s[-1], "mean": round(sum(s) / n, 2),
    }


def _conversation(rec: Record, which: str = "chosen") -> list[dict]:
    if rec.kind != "preference":
        return rec.messages
    answer = rec.chosen if which == "chosen" else rec.rejected
    if isinstance(answer, list):
        return rec.messages + answer
    return rec.messages + [{"role": "assistant", "content": answer}]


def _render_many(tokenizer, convs: list[list[dict]], add_generation_prompt: bool = False, tools: list | None = None) -> list[str]:
    from .template import _render

    if tools and any(tools):  # each record declares its own tools: rendered one by one
        return [_render(tokenizer, c, add_generation_prompt, t) for c, t in zip(convs, tools, strict=True)]

    try:  # one call renders the whole batch with the compiled template (much faster than a loop)
        out = tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=add_generation_prompt)
        if isinstance(out, list) and len(out) == len(convs) and all(isinstance(t, str) for t in out):
            return out
    except Exception:  # noqa: BLE001 - fall back to one-by-one to pin the failing record
        pass
    return [_render(tokenizer, c, add_generation_prompt) for c in convs]


def token_lengths(tokenizer, records: Sequence[Record], on_batch: Callable[[int], None] | None = None) -> list[int]:
    """Tokens per record exactly as training will see them (template rendered, EOS for text).

    A preference record counts its longer branch. A record the template cannot render gets -1.
    """
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for start in range(0, len(records), TOKENIZE_BATCH):
        chunk = records[start:start + TOKENIZE_BATCH]
        texts: list[str] = []
        for which in ("chosen", "rejected"):
            convs = [_conversation(r, which) for r in chunk if r.kind != "text"]
            tools = [r.tools for r in chunk if r.kind != "text"]
            if which == "rejected" and not any(r.kind == "preference" for r in chunk):
                break
            try:
                rendered = _render_many(tokenizer, convs, tools=tools)
            except Exception:  # noqa: BLE001
                rendered = []
                for c, t in zip(convs, tools, strict=True):
                    try:
                        rendered.append(_render_many(tokenizer, [c], tools=[t])[0])
                    except Exception:  # noqa: BLE001
                        rendered.append(None)
            texts.append(rendered)
        chat_lens: list[list[int]] = []
        for rendered in texts:
            ok = [t if t is not None else "" for t in rendered]
            ids = tokenizer(ok, add_special_tokens=False)["input_ids"] if ok else []
            chat_lens.append([len(x) if t is not None else -1 for x, t in zip(ids, rendered, strict=True)])
        plain = [r.text for r in chunk if r.kind == "text"]
        plain_ids = tokenizer(plain)["input_ids"] if plain else []
        ci = ti = 0
        for r in chunk:
            if r.kind == "text":
                ids = plain_ids[ti]
                ti += 1
                out.append(len(ids) + (1 if eos is not None and (not ids or ids[-1] != eos) else 0))
            else:
                n = chat_lens[0][ci]
                if r.kind == "preference" and len(chat_lens) > 1:
                    n = max(n, chat_lens[1][ci])
                ci += 1
                out.append(n)
        if on_batch:
            on_batch(len(chunk))
    return out


def prompt_length(tokenizer, rec: Record) -> int:
    """Tokens before the first token that carries loss (the text kind has none)."""
    if rec.kind == "text":
        return 0
    conv = _conversation(rec)
    k = next((i for i, m in enumerate(conv) if m["role"] == "assistant"), len(conv))
    if k == 0:
        return 0
    text = _render_many(tokenizer, [conv[:k]], add_generation_prompt=True, tools=[rec.tools])[0]
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def dominant_system_prompt(jsonl_path: str | Path, min_share: float = 0.5) -> str | None:
    """The system prompt used by at least ``min_share`` of a prepared split's chat rows, or None.

    The Ollama Modelfile uses it as ``SYSTEM`` so the served model gets the prompt it was trained with.
    """
    counts: Counter = Counter()
    rows = 0
    p = Path(jsonl_path)
    if not p.exists():
        return None
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list):
                prompt = row.get("prompt") if isinstance(row, dict) else None
                msgs = prompt if isinstance(prompt, list) else None
            rows += 1
            if msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
                content = msgs[0].get("content")
                if isinstance(content, str):
                    counts[content] += 1
    if not counts or rows == 0:
        return None
    best = max(counts.items(), key=lambda kv: kv[1])  # first-seen wins a tie (Counter keeps order)
    return best[0] if best[1] / rows >= min_share else None


def balance_hints(records: Sequence[Record], lengths: Sequence[int] | None) -> list[str]:
    """Cheap warnings that often explain a disappointing fine-tune."""
    hints: list[str] = []
    n = len(records)
    if n == 0:
        return ["no usable records"]
    if n < 50:
        hints.append(f"only {n} usable records: expect the model to memorise them; 200+ is a sensible minimum")
    answers: Counter = Counter()
    for r in records:
        if r.kind in ("chat", "completion"):
            last = next((m["content"] for m in reversed(r.messages) if m["role"] == "assistant"), None)
            if last is not None:
                answers[last.strip()[:200]] += 1
    if answers and n >= 10:
        top, cnt = answers.most_common(1)[0]
        if cnt / n >= 0.3:
            hints.append(f"{cnt / n:.0%} of records have the same final answer ({top[:60]!r}): the model may learn to always say it")
    if lengths:
        ls = sorted(x for x in lengths if x >= 0)
        if ls:
            p50 = ls[len(ls) // 2]
            if p50 and ls[-1] > 10 * p50 and ls[-1] > 512:
                hints.append(f"long tail: the longest record has {ls[-1]} tokens, 10x the median {p50}; consider --max-seq-len")
    return hints
