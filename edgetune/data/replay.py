"""Replay against forgetting: general rows mixed into the training split.

A narrow LoRA run drifts away from what the base model could do. Replay keeps some general rows in
every epoch:

* ``data.replay: 0.15`` makes 15% of the training split *self-distilled* rows: the base model's own
  answers (greedy, thinking off) to a shipped set of general prompts (explain, list, compare, advise,
  write, rewrite, define, small arithmetic; ``resources/replay/general_prompts.jsonl``). No external
  data is needed, and the rows are in the model's own words, so they pull it back toward its own
  behaviour rather than toward another model's. They are generated once per base model, chat
  template and prompt set, and cached under ``<models home>/cache/replay/``; a later run that needs
  more generates only the missing ones.
* ``data.mix: [{path: general.jsonl, share: 0.1}, ...]`` mixes rows from other files at fixed shares,
  chat and text rows alike (each row is encoded by its own layout).

Mixed rows go into the training split only (never valid or test), after the split, so evaluation
stays on the task; rows that duplicate a task record are skipped. The data card's ``mix`` block
records every source: share, rows, hashes, and for replay the model, runner and cache.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgetuneError
from .formats import Record, normalise
from .problems import Problem

PROMPTS = Path(__file__).resolve().parents[1] / "resources" / "replay" / "general_prompts.jsonl"
REPLAY_MAX_TOKENS = 160  # a general answer in a few sentences; longer ones are cut and not used


@dataclass
class MixSource:
    kind: str  # "replay" | "file"
    share: float
    path: str | None = None
    info: dict = field(default_factory=dict)


def sources(cfg) -> list[MixSource]:
    """The mix sources a data config asks for, checked (shares in (0, 0.9), together below 0.9)."""
    out = []
    if cfg.replay:
        out.append(MixSource("replay", float(cfg.replay)))
    for i, m in enumerate(cfg.mix or []):
        where = f"data.mix[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("path"), str) or "share" not in m:
            raise EdgetuneError(f"{where} must be {{path: FILE, share: 0.1}}, got {m!r}.",
                                fix="e.g. data.mix: [{path: general.jsonl, share: 0.1}]")
        unknown = sorted(set(m) - {"path", "share"})
        if unknown:
            raise EdgetuneError(f"{where} has unknown key(s) {', '.join(unknown)}.", fix="keys: path, share")
        try:
            share = float(m["share"])
        except (TypeError, ValueError):
            raise EdgetuneError(f"{where}.share must be a number, got {m['share']!r}.") from None
        if not 0.0 < share < 0.9:
            raise EdgetuneError(f"{where}.share = {share} is outside (0, 0.9).", fix="a share of the training split, e.g. 0.1")
        out.append(MixSource("file", share, m["path"]))
    total = sum(s.share for s in out)
    if total >= 0.9:
        raise EdgetuneError(f"data.replay and data.mix shares add up to {total:.2f}; they must stay below 0.9 "
                            "(the rest of the training split is the task).", fix="lower data.replay or the data.mix shares")
    return out


def wanted(n_task: int, srcs: list[MixSource]) -> list[int]:
    """Rows each source adds so that its share of the final training split is its ``share``."""
    total = n_task / (1.0 - sum(s.share for s in srcs)) if srcs else n_task
    return [max(1, round(s.share * total)) for s in srcs]


# ------------------------------------------------------------------------------ self-distilled rows
def load_prompts(path: Path = PROMPTS) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        raise EdgetuneError(f"{path} is not a prompt set (JSONL rows with 'prompt').", where=str(path))
    return rows


def cache_path(model_dir, chat_template: str | None, prompts_sha: str) -> Path:
    from ..model_dir import model_fingerprint
    from ..paths import home

    key = hashlib.sha256(json.dumps([model_fingerprint(model_dir), chat_template or "", prompts_sha,
                                     REPLAY_MAX_TOKENS]).encode()).hexdigest()[:20]
    return home() / "cache" / "replay" / f"{Path(model_dir).name}-{key}.jsonl"


def replay_runner_spec(model_dir) -> tuple[str, str]:
    """(runner spec, why): the fastest way this machine has to generate with the base model.

    An imported base (``models import``) runs on llama.cpp over the very GGUF it came from; on Apple
    Silicon with mlx-lm, MLX; otherwise the hf runner (batched, at the precision policy's dtype)."""
    from ..hardware import has_module
    from ..model_dir import read_source

    src = read_source(model_dir)
    if src is not None and src.path and Path(src.path).is_file():
        return f"base=gguf:{src.path}", "llama.cpp over the GGUF the base was imported from"
    import platform

    if platform.system() == "Darwin" and platform.machine() == "arm64" and has_module("mlx_lm"):
        return f"base=mlx:{model_dir}", "MLX on Apple Silicon"
    return f"base=hf:{model_dir}", "the hf runner, batched"


def self_distilled(model_dir, chat_template: str | None, n: int, *, seed: int = 0) -> tuple[list[dict], dict]:
    """``n`` chat rows: shipped general prompts answered by the base model itself (cached)."""
    from ..console import console
    from ..io import atomic_path, sha256_file

    prompts = load_prompts()
    psha = sha256_file(PROMPTS)
    cache = cache_path(model_dir, chat_template, psha)
    have: dict[str, dict] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                have[row["id"]] = row
            except (ValueError, KeyError, TypeError):
                continue  # a damaged cache line is regenerated
    # answers that ran into the token limit are cut mid-sentence and not trained on: when the cache
    # holds fewer than n usable answers, ask the next prompts in order, a quarter more than missing
    good_n = sum(1 for p in prompts if p["id"] in have and have[p["id"]]["finish"] == "stop")
    missing = max(0, n - good_n)
    todo = [p for p in prompts if p["id"] not in have][: missing + missing // 4 + 4] if missing else []
    spec, why = replay_runner_spec(model_dir)
    generated: set[str] = set()
    if todo:
        from ..eval.runners import GenParams, make_runner

        console.print(f"[bold]replay[/] the base model answers {len(todo)} general prompts ({why}); cached in {cache}")
        runner = make_runner(spec, chat_template=chat_template)
        try:
            think = False if (runner.thinking is not None and runner.thinking.switch) else None
            params = GenParams(max_tokens=REPLAY_MAX_TOKENS, temperature=0.0, think=think)
            from ..console import progress

            step = max(1, runner.batch_size)
            with progress(transient=True) as bar:
                task = bar.add_task("replay answers", total=len(todo))
                for i in range(0, len(todo), step):
                    chunk = todo[i:i + step]
                    gens = runner.generate_batch([[{"role": "user", "content": p["prompt"]}] for p in chunk], params)
                    for p, g in zip(chunk, gens, strict=True):
                        have[p["id"]] = {"id": p["id"], "prompt": p["prompt"], "answer": g.text.strip(),
                                         "finish": g.finish_reason if g.text.strip() else "empty", "think": think}
                        generated.add(p["id"])
                    bar.advance(task, len(chunk))
        finally:
            runner.close()
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for p in prompts:
                if p["id"] in have:
                    fh.write(json.dumps(have[p["id"]], ensure_ascii=False) + "\n")
    good = [have[p["id"]] for p in prompts if p["id"] in have and have[p["id"]]["finish"] == "stop"]
    rng = random.Random(seed)
    picked = good[:n] if len(good) <= n else rng.sample(good, n)
    rows = []
    for r in picked:
        row: dict[str, Any] = {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
        if r.get("think") is not None:
            row["enable_thinking"] = r["think"]
        rows.append(row)
    info = {"model": str(model_dir), "runner": spec.split("=", 1)[1], "runner_reason": why, "prompts": str(PROMPTS.name),
            "prompts_sha256": psha, "cache": str(cache), "generated_now": len(generated),
            "from_cache": sum(r["id"] not in generated for r in picked),
            "cut_or_empty_skipped": sum(1 for p in prompts if p["id"] in have and have[p["id"]]["finish"] != "stop"),
            "max_tokens": REPLAY_MAX_TOKENS}
    return rows, info


# ------------------------------------------------------------------------------ mixing
def mix_records(src: MixSource, n: int, *, model_dir, cfg, seed: int) -> tuple[list[Record], dict]:
    """Records of one mix source (``n`` wanted), normalised like task rows."""
    from .load import iter_source, list_sources

    if src.kind == "replay":
        if model_dir is None:
            raise EdgetuneError("data.replay needs the base model (its own answers are the replay rows).",
                                fix="pass --model, or run it from a recipe")
        rows, info = self_distilled(model_dir, cfg.chat_template, n, seed=seed)
        recs = []
        for i, row in enumerate(rows, 1):
            rec = normalise(row, "chat")
            rec.thinking = row.get("enable_thinking")
            rec.source, rec.line = "replay", i
            recs.append(rec)
        return recs, info
    from ..recipes import demo_resource

    path = demo_resource(src.path) or Path(src.path).expanduser()
    if not path.exists():
        raise EdgetuneError(f"data.mix file not found: {src.path}", where=str(src.path), fix="fix the path in data.mix")
    recs, bad = [], 0
    for fpath in list_sources(path):
        for item in iter_source(fpath):
            if item.problem is not None:
                bad += 1
                continue
            try:
                rec = normalise(item.obj, "auto")
            except Problem:
                bad += 1
                continue
            if rec.kind == "preference":
                raise EdgetuneError(f"{item.source}:{item.line}: data.mix takes chat and text rows, not preference pairs.",
                                    where=f"{item.source}:{item.line}", fix="mix preference data with the align stage's data instead")
            rec.source, rec.line = item.source, item.line
            recs.append(rec)
    rng = random.Random(seed)
    available = len(recs)
    picked = recs if available <= n else rng.sample(recs, n)
    from ..io import sha256_dir, sha256_file

    return picked, {"path": str(path), "sha256": sha256_dir(path) if path.is_dir() else sha256_file(path),
                    "available": available, "unreadable_skipped": bad}
