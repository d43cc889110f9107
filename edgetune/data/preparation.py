"""``validate`` (read-only report) and ``prepare`` (train/valid/test + rejects + data card).

Both run the same pipeline, so what ``validate`` reports is exactly what ``prepare`` would drop:

    read (file:line) -> normalise -> clean / redact PII -> one layout -> exact / near dedup
    -> token lengths + over-length policy -> group-aware split -> leakage check (enforced)

Every dropped record lands in ``rejects.jsonl`` with its source, line and reason. Outputs are
byte-identical for the same input and seed: no timestamps, stable orders, seeded shuffles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import EdgetuneError
from ..io import atomic_path, sha256_dir, sha256_file, write_json
from . import dedup as dd
from .clean import PII_KINDS, clean_text, redact_pii
from .formats import Record, normalise
from .load import RawLine, is_hub_id, iter_hub, iter_source, list_sources
from .problems import Problem

# Reasons that are a problem with the record itself (validate exits 1); the others are policy.
RECORD_PROBLEMS = {
    "bad_json", "bad_encoding", "line_too_long", "not_object", "unknown_format", "missing_field",
    "wrong_type", "empty_field", "unknown_role", "role_order", "no_assistant", "last_not_assistant",
    "chosen_equals_rejected", "empty_after_cleaning", "mixed_layout", "missing_group_field", "template_error",
    "bad_tools", "bad_tool_call", "tool_order", "reasoning_unsupported",
}
READ_PROBLEMS = {"bad_json", "bad_encoding", "line_too_long"}
PROGRESS_MIN = 5000  # show progress bars only for work that takes noticeable time


@dataclass
class Reject:
    source: str
    line: int
    reason: str
    detail: str
    field: str | None = None
    record: Any = None

    def row(self) -> dict:
        d = {"source": self.source, "line": self.line, "reason": self.reason, "detail": self.detail}
        if self.field:
            d["field"] = self.field
        d["record"] = json.loads(self.record) if isinstance(self.record, RawLine) else self.record
        return d

    def line_text(self) -> str:
        f = f" [{self.field}]" if self.field else ""
        return f"{self.source}:{self.line}{f}: {self.detail}"


@dataclass
class Result:
    """Everything one pipeline pass learned (``validate`` reports it, ``prepare`` writes it)."""

    sources: list[dict] = field(default_factory=list)
    rows_read: int = 0
    formats: Counter = field(default_factory=Counter)
    rejects: list[Reject] = field(default_factory=list)
    layout: str = "chat"
    cleaned: int = 0
    pii: Counter = field(default_factory=Counter)
    exact_dups: int = 0
    near_dups: int = 0
    lengths: dict[int, int] = field(default_factory=dict)  # id(record) -> tokens
    overlength: int = 0
    truncated: int = 0
    splits: dict[str, list[Record]] = field(default_factory=dict)
    n_groups: int = 0
    leak_exact: int = 0
    leak_near: int = 0
    tokenizer_info: dict | None = None
    chat_template: str | None = None  # the template text (the tool summary names its family)
    kept: list[Record] = field(default_factory=list)
    thinking: Any = None  # what the template does with reasoning (edgetune.reasoning.Thinking), with a tokenizer
    reasoning_dropped: int = 0  # records whose reasoning data.thinking: off removed
    reasoning_as_text: int = 0  # records whose reasoning data.thinking: text folded into the answer
    mix: dict | None = None  # what data.replay / data.mix added to the train split (edgetune.data.replay)


@contextmanager
def _bar(desc: str, total: int):
    if total < PROGRESS_MIN:
        yield lambda n: None
        return
    from ..console import progress

    with progress(transient=True) as p:
        task = p.add_task(desc, total=total)
        yield lambda n: p.advance(task, n)


def _reject(res: Result, rec: Record, reason: str, detail: str, field_: str | None = None) -> None:
    res.rejects.append(Reject(rec.source, rec.line, reason, detail, field_, rec.raw))


def _source_hash(p: Path) -> str:
    return sha256_dir(p) if p.is_dir() else sha256_file(p)


def _read(path, cfg: DataConfig, res: Result) -> list[Record]:
    records: list[Record] = []
    hub = is_hub_id(path)
    sources = [path] if hub else list_sources(path)
    jsonl_bytes = 0 if hub else sum(s.stat().st_size for s in sources if s.is_file() and s.suffix.lower() in (".jsonl", ".ndjson"))
    with _bar("Reading (bytes)", jsonl_bytes if jsonl_bytes > 20 << 20 else 0) as adv:
        for src in sources:
            _read_source(src, hub, path, cfg, res, records, adv)
    return records


def _read_source(src, hub: bool, path, cfg: DataConfig, res: Result, records: list[Record], adv) -> None:
    n = 0
    for item in iter_hub(str(path)) if hub else iter_source(src):
        n += 1
        if item.nbytes:
            adv(item.nbytes)
        if item.problem is not None:
            p = item.problem
            res.rejects.append(Reject(item.source, item.line, p.code, p.message, p.field, item.raw))
            continue
        try:
            rec = normalise(item.obj, cfg.format)
        except Problem as p:
            res.rejects.append(Reject(item.source, item.line, p.code, p.message, p.field, item.obj))
            continue
        rec.source, rec.line = item.source, item.line
        rec.raw = item.line_text if item.line_text is not None else item.obj
        if cfg.group_by:
            g = item.obj.get(cfg.group_by)
            if g is None or g == "":
                _reject(res, rec, "missing_group_field", f"no '{cfg.group_by}' value to group by", cfg.group_by)
                continue
            rec.group = g if isinstance(g, str) else json.dumps(g, sort_keys=True, ensure_ascii=False)
        res.formats[rec.fmt] += 1
        records.append(rec)
    res.sources.append({"path": f"hub:{src}" if hub else str(src), "sha256": None if hub else _source_hash(src), "rows": n})
    res.rows_read += n


def _clean_messages(msgs: list[dict], fn) -> list[dict]:
    return [{**m, "content": fn(m["content"])} for m in msgs]


def _clean(records: list[Record], cfg: DataConfig, res: Result) -> list[Record]:
    def fn(s):
        t = clean_text(s)
        return redact_pii(t, res.pii) if cfg.redact_pii else t

    out = []
    for rec in records:
        before = rec.dedup_text()
        if rec.kind == "text":
            rec.text = fn(rec.text)
        else:
            rec.messages = _clean_messages(rec.messages, fn)
            if rec.kind == "preference":
                rec.chosen = fn(rec.chosen) if isinstance(rec.chosen, str) else _clean_messages(rec.chosen, fn)
                rec.rejected = fn(rec.rejected) if isinstance(rec.rejected, str) else _clean_messages(rec.rejected, fn)
        empty = (rec.kind == "text" and not rec.text) or any(
            not m["content"] and not m.get("tool_calls") for m in rec.messages
        ) or (rec.kind == "preference" and (not rec.chosen or not rec.rejected))
        if empty:
            _reject(res, rec, "empty_after_cleaning", "a field is empty after removing control/zero-width characters")
            continue
        if rec.dedup_text() != before:
            res.cleaned += 1
        out.append(rec)
    return out


_LAYOUT_GROUP = {"chat": "chat", "completion": "chat", "text": "text", "preference": "preference"}


def _one_layout(records: list[Record], res: Result) -> list[Record]:
    """mlx-lm reads one layout per file: keep the largest family, reject the others."""
    groups = Counter(_LAYOUT_GROUP[r.kind] for r in records)
    if not groups:
        return records
    order = ("chat", "text", "preference")
    main = max(order, key=lambda g: (groups[g], -order.index(g)))
    kept = []
    for r in records:
        if _LAYOUT_GROUP[r.kind] == main:
            kept.append(r)
        else:
            _reject(res, r, "mixed_layout", f"a {r.kind} record among {main} records (one layout per dataset; prepare it separately)")
    if main == "chat":
        res.layout = "completion" if all(r.kind == "completion" for r in kept) else "chat"
    else:
        res.layout = main
    return kept


def _dedup(records: list[Record], cfg: DataConfig, res: Result, keys: list[str]):
    """Returns kept records, their exact keys and MinHash signatures (None when not computed)."""
    if cfg.dedup != "off":
        seen: dict[str, Record] = {}
        kept, kept_keys = [], []
        for rec, k in zip(records, keys, strict=True):
            if k in seen:
                first = seen[k]
                _reject(res, rec, "duplicate", f"exact duplicate of {first.where}")
                res.exact_dups += 1
                continue
            seen[k] = rec
            kept.append(rec)
            kept_keys.append(k)
        records, keys = kept, kept_keys
    with _bar("MinHash", len(records)) as adv:
        sigs = dd.signatures([r.near_text() for r in records], on_batch=adv)
    if cfg.dedup == "near":
        dup_of = dd.near_duplicates(sigs, cfg.near_threshold)
        if dup_of:
            keep_idx = [i for i in range(len(records)) if i not in dup_of]
            for i, j in sorted(dup_of.items()):
                _reject(res, records[i], "near_duplicate", f"near-duplicate (Jaccard >= {cfg.near_threshold}) of {records[j].where}")
            res.near_dups = len(dup_of)
            records = [records[i] for i in keep_idx]
            keys = [keys[i] for i in keep_idx]
            sigs = sigs[keep_idx]
    return records, keys, sigs


def _tokens(records: list[Record], cfg: DataConfig, res: Result, tokenizer) -> tuple[list[int], list[int]]:
    from .stats import prompt_length, token_lengths

    with _bar("Tokenizing", len(records)) as adv:
        lengths = token_lengths(tokenizer, records, on_batch=adv)
    keep = []
    for i, (rec, n) in enumerate(zip(records, lengths, strict=True)):
        if n < 0:
            _reject(res, rec, "template_error", "the chat template cannot render this record" + _template_reason(tokenizer, rec))
            continue
        if n > cfg.max_seq_len:
            res.overlength += 1
            if cfg.overlength == "drop":
                _reject(res, rec, "overlength", f"{n} tokens > max_seq_len {cfg.max_seq_len} (policy: drop)")
                continue
            if cfg.overlength == "truncate":
                if prompt_length(tokenizer, rec) >= cfg.max_seq_len:
                    _reject(res, rec, "prompt_too_long", f"the prompt alone fills max_seq_len {cfg.max_seq_len}: nothing left to learn after truncation")
                    continue
                res.truncated += 1
        keep.append(i)
    return keep, lengths


def _thinking(records: list[Record], cfg: DataConfig, res: Result, tokenizer) -> list[Record]:
    """Apply ``data.thinking`` to every chat record: set its thinking switch, drop or fold its
    reasoning; with a template that cannot render reasoning, reject records that carry it (unless
    ``thinking: text``) rather than train on answers whose reasoning silently vanished."""
    from ..reasoning import NONE, probe_tokenizer

    res.thinking = probe_tokenizer(tokenizer) if tokenizer is not None else None
    t = res.thinking or NONE
    kept = []
    for rec in records:
        has = rec.has_reasoning
        if has and cfg.thinking == "off":
            _strip_reasoning(rec, fold=False)
            res.reasoning_dropped += 1
            has = False
        elif has and cfg.thinking == "text":
            _strip_reasoning(rec, fold=True)
            res.reasoning_as_text += 1
            has = False
        elif has and res.thinking is not None and not t.renders:
            _reject(res, rec, "reasoning_unsupported",
                    "the record has reasoning (reasoning_content / thinking / <think>) but the chat template has no "
                    "thinking block, so training would lose it: set data.thinking: text to keep it as text in the "
                    "answer, off to drop it, or use a thinking template (--chat-template qwen3)", "messages")
            continue
        if rec.kind == "chat" and t.switch and cfg.thinking != "text":
            if rec.thinking is None:
                rec.thinking = {"on": True, "off": False}.get(cfg.thinking, has)
            if rec.thinking is False and has:
                _strip_reasoning(rec, fold=False)  # thinking off: the template would not show it at inference
                res.reasoning_dropped += 1
        elif not t.switch:
            rec.thinking = None  # nothing to switch: the template ignores enable_thinking
        kept.append(rec)
    return kept


def _strip_reasoning(rec: Record, *, fold: bool) -> None:
    from ..reasoning import MARKERS

    o, c = MARKERS[0]
    turns = list(rec.messages) + [m for a in (rec.chosen, rec.rejected) if isinstance(a, list) for m in a]
    for m in turns:
        why = m.pop("reasoning_content", None)
        if why and fold:
            m["content"] = f"{o}\n{why}\n{c}\n\n{m['content']}"


def reasoning_summary(records: list[Record], res: Result) -> dict | None:
    """The data card's ``thinking`` block: rows with and without reasoning, the switch per record."""
    if not records:
        return None
    with_r = [r for r in records if r.has_reasoning]
    if not with_r and not res.reasoning_dropped and not res.reasoning_as_text and not any(r.thinking is not None for r in records):
        return None
    lengths = [len(m["reasoning_content"]) for r in with_r for m in r.messages if m.get("reasoning_content")]
    t = res.thinking
    return {
        "template_renders_reasoning": t.renders if t is not None else None,
        "template_switch": t.switch if t is not None else None,
        "records_with_reasoning": len(with_r),
        "records_without_reasoning": len(records) - len(with_r),
        "thinking_on": sum(r.thinking is True for r in records),
        "thinking_off": sum(r.thinking is False for r in records),
        "reasoning_dropped": res.reasoning_dropped,
        "reasoning_as_text": res.reasoning_as_text,
        "reasoning_chars_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
    }


def _template_reason(tokenizer, rec: Record) -> str:
    """The template's own message (e.g. Llama's "only supports single tool-calls", Mistral's 9-character ids)."""
    from .stats import _conversation
    from .template import _render

    try:
        _render(tokenizer, _conversation(rec), False, rec.tools)
    except EdgetuneError as exc:
        return ": " + exc.message.removeprefix("The chat template could not render this conversation: ")
    return ""


def _split(records: list[Record], keys: list[str], cfg: DataConfig) -> tuple[list[str], int]:
    """Group-aware, deterministic: groups ordered by a seeded hash, cut by record counts."""
    gkeys = [r.group if cfg.group_by else k for r, k in zip(records, keys, strict=True)]
    sizes: dict[str, int] = {}
    for g in gkeys:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{cfg.seed}\x00{g}".encode()).digest())
    n = len(records)
    # at least one valid/test record when asked for and n allows it (mlx-lm wants a non-empty valid)
    want = {
        name: max(1 if (ratio > 0 and n >= 5) else 0, round(n * ratio))
        for name, ratio in (("test", cfg.test_ratio), ("valid", cfg.valid_ratio))
    }
    where: dict[str, str] = {}
    got = {"test": 0, "valid": 0}
    it = iter(order)
    for name in ("test", "valid"):
        while got[name] < want[name]:
            g = next(it, None)
            if g is None:
                break
            if n - got["test"] - got["valid"] - sizes[g] < 1:  # never empty train
                where[g] = "train"
                break
            where[g] = name
            got[name] += sizes[g]
    for g in it:
        where[g] = "train"
    return [where.get(g, "train") for g in gkeys], len(sizes)


def run_pipeline(path, cfg: DataConfig, model_dir=None, *, mix: bool = False) -> Result:
    """Read, clean, dedup, measure and split; ``mix``: also add data.replay / data.mix rows to train."""
    res = Result()
    tokenizer = None
    if model_dir is not None:
        from .template import load_tokenizer

        tokenizer = load_tokenizer(model_dir, cfg.chat_template)
        tpl = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template)
        res.tokenizer_info = {
            "model": str(model_dir),
            "tokenizer": type(tokenizer).__name__,
            "chat_template": cfg.chat_template or "model",
            "chat_template_sha256": hashlib.sha256(tpl.encode()).hexdigest(),
            "eos_token": tokenizer.eos_token,
        }
        res.chat_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    records = _read(path, cfg, res)
    records = _clean(records, cfg, res)
    records = _thinking(records, cfg, res, tokenizer)
    records = _one_layout(records, res)
    keys = [dd.exact_key(r.dedup_text()) for r in records]
    records, keys, sigs = _dedup(records, cfg, res, keys)
    if tokenizer is not None:
        keep, lengths = _tokens(records, cfg, res, tokenizer)
        for i in keep:
            res.lengths[id(records[i])] = lengths[i]
        records = [records[i] for i in keep]
        keys = [keys[i] for i in keep]
        sigs = sigs[keep]
    res.kept = list(records)
    assign, res.n_groups = _split(records, keys, cfg)
    idx = {"train": [], "valid": [], "test": []}
    for i, s in enumerate(assign):
        idx[s].append(i)
    # Leakage: no valid/test record may be an exact or near duplicate of a train record.
    train_keys = {keys[i] for i in idx["train"]}
    held = idx["valid"] + idx["test"]
    leaked: set[int] = set()
    for i in held:
        if keys[i] in train_keys:
            leaked.add(i)
            res.leak_exact += 1
            _reject(res, records[i], "leakage", f"exact duplicate of a train record (split '{assign[i]}')")
    rest = [i for i in held if i not in leaked]
    # After near dedup no two kept records are near-duplicates, so only dedup=exact|off needs the
    # (second) LSH pass over train.
    if rest and idx["train"] and cfg.dedup != "near":
        for i, j in sorted(dd.cross_matches(sigs, cfg.near_threshold, idx["train"], rest).items()):
            leaked.add(i)
            res.leak_near += 1
            _reject(res, records[i], "leakage_near", f"near-duplicate of train record {records[j].where} (split '{assign[i]}')")
    res.splits = {name: [records[i] for i in ids if i not in leaked] for name, ids in idx.items()}
    random.Random(cfg.seed).shuffle(res.splits["train"])
    if mix and (cfg.replay or cfg.mix):
        _mix(res, cfg, tokenizer, model_dir, set(keys))
    return res


def _mix(res: Result, cfg: DataConfig, tokenizer, model_dir, task_keys: set[str]) -> None:
    """Add data.replay / data.mix rows to the train split at their shares (edgetune/data/replay.py):
    after the split, so valid and test stay the task's; rows duplicating a task record are skipped."""
    from .replay import mix_records, sources, wanted
    from .stats import token_lengths

    srcs = sources(cfg)
    if res.layout == "preference":
        raise EdgetuneError("data.replay / data.mix add chat and text rows to SFT data; this data is preference pairs.",
                            fix="drop data.replay / data.mix here (the SFT stage of a run with align: takes them)")
    n_task = len(res.splits["train"])
    res.mix = {"task_train_rows": n_task, "sources": []}
    added: list[Record] = []
    for k, (src, n) in enumerate(zip(srcs, wanted(n_task, srcs), strict=True)):
        recs, info = mix_records(src, n, model_dir=model_dir, cfg=cfg, seed=cfg.seed + k)
        recs = _clean(recs, cfg, Result())
        kept, dups, over = [], 0, 0
        for r in recs:
            key = dd.exact_key(r.dedup_text())
            if key in task_keys:
                dups += 1
                continue
            task_keys.add(key)
            kept.append(r)
        if tokenizer is not None and kept:
            lengths = token_lengths(tokenizer, kept)
            fits = []
            for r, n_tok in zip(kept, lengths, strict=True):
                if n_tok < 0 or (n_tok > cfg.max_seq_len and cfg.overlength == "drop"):
                    over += 1
                    continue
                res.lengths[id(r)] = n_tok
                fits.append(r)
            kept = fits
        added += kept
        res.mix["sources"].append({"kind": src.kind, "share": src.share, "wanted": n, "rows": len(kept),
                                   "duplicates_skipped": dups, "overlength_skipped": over,
                                   "text_rows": sum(r.kind == "text" for r in kept), **info})
    train = res.splits["train"] + added
    random.Random(cfg.seed + 1).shuffle(train)
    res.splits["train"] = train
    res.mix["train_rows"] = len(train)
    res.mix["mixed_share"] = round(len(added) / len(train), 4) if train else 0.0


# ----------------------------------------------------------------------------------------------
# validate


@dataclass
class ValidationReport:
    path: str
    rows: int = 0
    usable: int = 0
    formats: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # "file:line [field]: message"
    issues: list[dict] = field(default_factory=list)  # the same, structured: source, line, reason, detail, field
    problem_counts: dict = field(default_factory=dict)
    duplicates: dict = field(default_factory=dict)
    tokens: dict | None = None
    overlength: int = 0
    max_seq_len: int = 0
    hints: list[str] = field(default_factory=list)
    fatal: str | None = None  # unreadable input

    @property
    def exit_code(self) -> int:
        if self.fatal:
            return 2
        return 1 if self.problems else 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exit_code"] = self.exit_code
        return d


def validate(path, cfg: DataConfig | None = None, model_dir=None) -> ValidationReport:
    """Read-only report: problems per record (file:line), formats, duplicates, token lengths.

    ``exit_code``: 0 clean, 1 problems found, 2 unreadable input. Never raises for bad data;
    raises :class:`EdgetuneError` only for a bad model/template.
    """
    cfg = cfg or DataConfig()
    rep = ValidationReport(path=str(path), max_seq_len=cfg.max_seq_len)
    # validate keeps over-length records (it only counts them)
    vcfg = dataclasses.replace(cfg, overlength="keep")
    try:
        res = run_pipeline(path, vcfg, model_dir)
    except EdgetuneError as exc:
        if exc.exit_code == 2:
            rep.fatal = exc.render()
            return rep
        raise
    rep.rows = res.rows_read
    rep.formats = dict(sorted(res.formats.items()))
    probs = sorted((r for r in res.rejects if r.reason in RECORD_PROBLEMS), key=_reject_sort_key(res))
    rep.problems = [r.line_text() for r in probs]
    rep.issues = [{k: v for k, v in r.row().items() if k != "record"} for r in probs]
    rep.problem_counts = dict(sorted(Counter(r.reason for r in probs).items()))
    rep.usable = len(res.kept)
    n = max(1, len(res.kept) + res.exact_dups + res.near_dups)
    rep.duplicates = {
        "exact": res.exact_dups, "near": res.near_dups, "mode": cfg.dedup,
        "rate": round((res.exact_dups + res.near_dups) / n, 4),
        "leaking_into_valid_test": res.leak_exact + res.leak_near,
    }
    lengths = [res.lengths[id(r)] for r in res.kept] if res.lengths else None
    if lengths is not None:
        from .stats import length_stats

        rep.tokens = {**(res.tokenizer_info or {}), **length_stats(lengths)}
        rep.overlength = res.overlength
    from .stats import balance_hints

    rep.hints = balance_hints(res.kept, lengths)
    rep.hints += _tool_hints(res, cfg)
    if rep.rows and not res.kept and all(r.reason in READ_PROBLEMS for r in res.rejects):
        rep.fatal = "no record could be read (every line is invalid JSON or not UTF-8)"
    if rep.duplicates["rate"] >= 0.1:
        rep.hints.append(f"{rep.duplicates['rate']:.0%} duplicates: `prepare` drops them (--dedup)")
    if rep.overlength:
        rep.hints.append(f"{rep.overlength} records exceed max_seq_len {cfg.max_seq_len} (policy for prepare: {cfg.overlength})")
    return rep


# ----------------------------------------------------------------------------------------------
# prepare


def _row_layout(rec: Record, layout: str) -> str:
    """The layout one row is written in: the split's, unless data.mix put a row of another kind in it
    (a text row among chats, a multi-turn chat among prompt/completion rows): then its own."""
    if rec.kind == "text":
        return "text"
    if layout == "completion" and rec.kind != "completion":
        return "chat"
    return "chat" if layout == "text" else layout


def _write_split(path: Path, records: list[Record], layout: str) -> str:
    h = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            line = json.dumps(r.to_row(_row_layout(r, layout)), ensure_ascii=False, default=str) + "\n"
            fh.write(line)
            h.update(line.encode("utf-8"))
    return h.hexdigest()


def prepare(path, out_dir, cfg: DataConfig | None = None, model_dir=None) -> dict:
    """Write ``train/valid/test.jsonl``, ``rejects.jsonl`` and ``data_card.json`` to ``out_dir``.

    Returns the data card. Raises :class:`EdgetuneError` (exit code 2) for unreadable input and
    when nothing usable is left.
    """
    from .. import __version__
    from .stats import length_stats

    cfg = cfg or DataConfig()
    res = run_pipeline(path, cfg, model_dir, mix=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(v) for v in res.splits.values())
    if total == 0:
        _write_rejects(out / "rejects.jsonl", res)
        top = Counter(r.reason for r in res.rejects).most_common(3)
        raise EdgetuneError(
            f"No usable records in {path} ({res.rows_read} rows read; top reasons: "
            + ", ".join(f"{k} x{v}" for k, v in top) + ").",
            where=str(out / "rejects.jsonl"),
            fix="run `edgetune data validate` on the input and fix the reported lines",
            exit_code=2,
        )
    files = {}
    for name in ("train", "valid", "test"):
        if res.splits[name]:
            files[f"{name}.jsonl"] = _write_split(out / f"{name}.jsonl", res.splits[name], res.layout)
        else:  # mlx-lm treats a missing split as empty but crashes on an empty file
            (out / f"{name}.jsonl").unlink(missing_ok=True)
    files["rejects.jsonl"] = _write_rejects(out / "rejects.jsonl", res)
    card: dict[str, Any] = {
        "edgetune_version": __version__,
        "input": str(path),
        "sources": res.sources,
        "config": dataclasses.asdict(cfg),
        "layout": res.layout,
        "formats": dict(sorted(res.formats.items())),
        "counts": {
            "rows_read": res.rows_read,
            "records_out": total,
            "rejected": len(res.rejects),
            "rejected_by_reason": dict(sorted(Counter(r.reason for r in res.rejects).items())),
        },
        "cleaning": {
            "records_modified": res.cleaned,
            "pii_redaction": cfg.redact_pii,
            "pii_redacted": {k: res.pii.get(k, 0) for k in PII_KINDS} if cfg.redact_pii else {},
        },
        "dedup": {
            "mode": cfg.dedup, "near_threshold": cfg.near_threshold, "num_perm": dd.NUM_PERM,
            "exact_removed": res.exact_dups, "near_removed": res.near_dups,
        },
        "splits": {
            "train": len(res.splits["train"]), "valid": len(res.splits["valid"]), "test": len(res.splits["test"]),
            "seed": cfg.seed, "group_by": cfg.group_by, "groups": res.n_groups,
        },
        "leakage": {
            "checked": ["exact", f"near (MinHash Jaccard >= {cfg.near_threshold})"
                        + (" via global near dedup" if cfg.dedup == "near" else "")],
            "exact_removed": res.leak_exact, "near_removed": res.leak_near, "remaining": 0,
        },
        "tokens": None,
        "tools": _tool_summary(res, cfg),
        "thinking": reasoning_summary(res.kept, res),
        "mix": res.mix,
        "files": files,
    }
    if res.tokenizer_info is not None:
        card["tokens"] = {
            **res.tokenizer_info,
            "max_seq_len": cfg.max_seq_len,
            "overlength_policy": cfg.overlength,
            "overlength": res.overlength,
            "truncated_at_train_time": res.truncated,
            "per_split": {
                name: length_stats([res.lengths[id(r)] for r in recs]) for name, recs in res.splits.items()
            },
        }
    write_json(out / "data_card.json", card)
    return card


def _tool_summary(res: Result, cfg: DataConfig) -> dict | None:
    from .tools import summarise

    return summarise(res.kept, res.chat_template)


def _tool_hints(res: Result, cfg: DataConfig) -> list[str]:
    """``data validate``/``prepare`` warn when tool text cannot be reproduced by an Ollama TEMPLATE."""
    from .tools import card_warnings

    return card_warnings(_tool_summary(res, cfg))


def _reject_sort_key(res: Result):
    order = {s["path"]: i for i, s in enumerate(res.sources)}

    def key(r: Reject):
        base = r.source.split("[", 1)[0]
        return (order.get(r.source, order.get(base, len(order))), r.source, r.line)

    return key


def _write_rejects(path: Path, res: Result) -> str:
    key = _reject_sort_key(res)

    h = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for r in sorted(res.rejects, key=key):
            line = json.dumps(r.row(), ensure_ascii=False, default=str) + "\n"
            fh.write(line)
            h.update(line.encode("utf-8"))
    return h.hexdigest()
