"""What one optimizer step holds, sized to the data, said before anything loads.

Packed rows are ``max_seq_len`` tokens long, so a length meant for 2k-token documents puts ~180
short chats into every row: 40 "batch size 4" steps become 25 epochs and 12 GB for a 135M model.
So an unset ``train.max_seq_len`` (None) means what the prepared train split needs: its p99 token
length (the max under 100 examples, where the two barely differ) rounded up to a multiple of 64,
capped by the model's context (config.json ``max_position_embeddings``) and by 2048. The lengths
come from ``data_card.json`` (written by ``edgetune data prepare`` with this model) when it has
them, else from tokenizing ``train.jsonl``.

``size(...)`` resolves the length once, before the loop, and estimates what a step holds (examples,
tokens, the epochs the step count implies, memory); ``warnings`` name the flag that changes each.
The figures are estimates from the mean example length; the loop's packing is exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

ROUND = 64  # row lengths in multiples of 64: few distinct shapes, at most 63 slots of slack
CAP = 2048  # the most "from the data" picks: longer rows cost memory quadratically on CPU attention
SMALL_SPLIT = 100  # below this many examples p99 is the max anyway: use the max, truncate nothing
EPOCHS_WARN = 5.0  # more passes than this over small data memorises it
MEMORY_WARN = 0.8  # of the memory available now


@dataclass
class Sizing:
    max_seq_len: int
    max_seq_len_source: str  # where the value came from, in words
    train_examples: int
    mean_tokens: float  # mean train example length, after truncation at max_seq_len (estimated)
    packing: bool
    examples_per_row: int  # packed: examples first-fit into one row (estimated); padded: 1
    examples_per_step: int
    steps: int
    epochs: float  # steps x examples_per_step / train_examples
    tokens_per_step: int  # real (non-pad) tokens
    memory: dict = field(default_factory=dict)
    sequences_per_example: int = 1  # DPO/ORPO: 2 (prompt+chosen and prompt+rejected rows); GRPO: num_generations
    row_kind: str = "example"  # example | pair | sampled (what a padded row holds, for the summary)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_context(model_dir) -> int | None:
    """The model's context length from config.json, or None when it does not say."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("max_position_embeddings")
    return int(n) if n else None


def _card_stats(model_dir, data_dir) -> dict | None:
    """The data card's train token stats, if it was tokenized with this model's tokenizer."""
    try:
        card = json.loads((Path(data_dir) / "data_card.json").read_text())
    except (OSError, ValueError):
        return None
    tokens = card.get("tokens") or {}
    stats = (tokens.get("per_split") or {}).get("train") or {}
    if not stats.get("count") or not {"p99", "max", "mean"} <= stats.keys():
        return None  # no tokenizer at prepare time, or a card from before p99 was recorded
    if tokens.get("model") and Path(tokens["model"]).resolve() != Path(model_dir).resolve():
        return None  # another model's tokenizer counted these
    return stats


def _tokenized_stats(model_dir, data_dir, chat_template, objective: str = "sft") -> dict:
    from ..data.stats import length_stats
    from ..data.template import load_tokenizer
    from .objectives import get

    tok = load_tokenizer(model_dir, chat_template=chat_template)
    train = Path(data_dir) / "train.jsonl"
    examples, _ = get(objective).encode(train, tok, None)
    return length_stats([len(e.ids) for e in examples])


def train_length_stats(model_dir, data_dir, chat_template=None, objective: str = "sft") -> tuple[dict, str]:
    """(length stats of the train split as ``objective`` encodes it, where they came from; the data
    card's row lengths unless the objective generates: GRPO's rows are prompts, measured as encoded)."""
    from .objectives import get

    stats = _card_stats(model_dir, data_dir) if get(objective).start is None else None
    if stats is not None:
        return stats, "data_card.json"
    return _tokenized_stats(model_dir, data_dir, chat_template, objective), "train.jsonl tokenized"


def seq_len_from_data(stats: dict, where: str, context: int | None) -> tuple[int, str]:
    """(row length, why) for train stats ``stats``: p99 (max when small) rounded up, capped."""
    small = stats["count"] < SMALL_SPLIT
    need = int(stats["max"] if small else stats["p99"])
    n = max(ROUND, -(-need // ROUND) * ROUND)
    why = f"from the data: train {'max' if small else 'p99'} {need} tokens ({where}), rounded up to {ROUND}"
    if context and context < min(n, CAP):
        return context, why + f", capped at the model's context {context}"
    if n > CAP:
        return CAP, why + f", capped at {CAP}"
    return n, why


def size(model_dir, data_dir, cfg, backend: str, *, chat_template=None, world_size: int = 1):
    """(``cfg`` with ``max_seq_len`` resolved, :class:`Sizing`) for training on ``backend``."""
    from .memory import estimate_memory
    from .objectives import get
    from .support import resolve

    objective = get(cfg.objective)
    stats, where = train_length_stats(model_dir, data_dir, chat_template, cfg.objective)
    if cfg.max_seq_len is None:
        seq, source = seq_len_from_data(stats, where, model_context(model_dir))
        cfg = dataclasses.replace(cfg, max_seq_len=seq)
    else:
        seq, source = cfg.max_seq_len, "set (recipe or --max-seq-len)"
    packing = bool(resolve(cfg, backend).packing)
    n = max(1, int(stats.get("count") or 0))
    mean = min(float(stats.get("mean") or 1.0), float(seq))
    per_row = max(1, int(seq // math.ceil(mean))) if packing else 1  # examples (pairs: pairs) per row
    rows = math.ceil(n / per_row)
    micro = cfg.grad_accum * world_size  # micro-batches per optimizer step
    per_micro = min(n, cfg.batch_size * per_row)
    per_step = micro * per_micro
    steps = cfg.iters or max(1, math.ceil(cfg.epochs * math.ceil(rows / cfg.batch_size) / micro))
    epochs = steps * per_step / n
    memory = estimate_memory(model_dir, cfg)
    # rows per example: a pair is two sequences (mean: of the longer branch, an upper bound); a GRPO prompt
    # is num_generations rows of prompt + up to max_completion_length sampled tokens
    seqs = objective.rows_per_example(cfg)
    mean = mean + objective.tokens_beyond(cfg)
    s = Sizing(seq, source, n, round(mean, 1), packing, per_row, per_step, steps, round(epochs, 2),
               int(round(per_step * mean * seqs)), memory, seqs,
               "pair" if objective.preference else "sampled" if objective.start else "example")
    if epochs > EPOCHS_WARN:
        how = "--iters" if cfg.iters else "--epochs"
        s.warnings.append(
            f"{steps} steps x ~{per_step} examples/step = ~{epochs:.1f} epochs over {n} training examples: "
            f"it will memorise them; lower {how}, or fewer examples per step with --batch-size"
            + (", --max-seq-len or --no-packing" if packing and per_row > 1 else ""))
    total, avail = memory.get("total_gb"), memory.get("available_gb")
    if total and avail and total > MEMORY_WARN * avail:
        s.warnings.append(f"~{total} GB estimated, {avail} GB available: lower --batch-size or --max-seq-len, "
                          "or add --gradient-checkpointing")
    return cfg, s


def lines(s: Sizing) -> list[str]:
    """The human summary, one line each."""
    how = (f"{s.examples_per_row} example(s)/row packed into {s.max_seq_len}-token rows" if s.packing
           else "padded, two rows (chosen, rejected) per pair" if s.row_kind == "pair"
           else f"padded, {s.sequences_per_example} sampled completions per prompt" if s.row_kind == "sampled"
           else "padded, one example per row")
    m = s.memory
    return [
        f"max_seq_len {s.max_seq_len} ({s.max_seq_len_source})",
        f"per step: ~{s.examples_per_step} examples ({how}), ~{s.tokens_per_step} tokens",
        f"{s.steps} steps = ~{s.epochs:g} epochs over {s.train_examples} training examples",
        f"memory: ~{m.get('total_gb')} GB estimated, {m.get('available_gb')} GB available",
    ]


def announce(s: Sizing, printer=None) -> None:
    """Print the summary and the warnings (yellow) before training starts."""
    from ..console import console

    p = printer or console
    for line in lines(s):
        p.print(line, highlight=False, soft_wrap=True)
    for w in s.warnings:
        console.print(f"[yellow]warning: {w}[/]", highlight=False, soft_wrap=True)
