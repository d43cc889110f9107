"""From prepared JSONL splits to training batches, shared by the torch and MLX backends.

Tokens and completion-only loss masks come from ``edgetune.data.template.encode_example`` (the one
masking implementation). This module only decides which examples share a batch:

* ``packing=True`` (torch): examples are first-fit packed into rows of ``max_seq_len`` tokens;
  ``position_ids`` restart at 0 for each example so attention never crosses examples (transformers
  builds a block-diagonal causal mask from the restarts). Rows are nearly full, so almost no compute
  is spent on padding.
* ``packing=False``: one example per row, padded to the longest row of its batch; with
  ``group_by_length`` similar lengths share a batch (MLX always uses this: its models take no
  position ids, so packed rows would attend across examples).

Labels are already shifted (``labels[t]`` is the target for the logits at ``t``) and are -100
wherever the mask is 0, at the last token of every example (so no example predicts the next one)
and on padding. The plan for an epoch depends only on ``(seed, epoch)``, which is what lets
``--resume`` continue from a batch index and see exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EdgetuneError

if TYPE_CHECKING:  # numpy is imported where batches are built: the objectives' table (read by edgetune.config
    import numpy as np  # at every command's start) must not pull it in

IGNORE = -100
SPLITS = ("train", "valid", "test")


@dataclass
class TokenizedExample:
    """One training sequence: token ids and its loss mask (1 = a token the loss is taken on)."""

    ids: list[int]
    mask: list[int]

    @property
    def n_target(self) -> int:
        return sum(self.mask[1:])


@dataclass
class Batch:
    input_ids: np.ndarray  # [B, L] int64
    labels: np.ndarray  # [B, L] int64, shifted, IGNORE where no loss
    position_ids: np.ndarray  # [B, L] int64, restart at 0 per packed example
    n_tokens: int  # real (non-pad) tokens
    n_target: int  # tokens that carry loss

    @property
    def n_slots(self) -> int:
        return int(self.input_ids.size)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EdgetuneError(
                    f"Invalid JSON: {exc.msg}", where=f"{path}:{lineno}", fix="run `edgetune data` on the raw data first"
                ) from None
            if not isinstance(row, dict):
                raise EdgetuneError("Each line must be a JSON object.", where=f"{path}:{lineno}")
            rows.append(row)
    return rows


def check_data_dir(data_dir: str | Path) -> dict[str, Path]:
    """The split files present; a clear error before anything loads when train.jsonl is missing."""
    d = Path(data_dir)
    if not d.is_dir():
        raise EdgetuneError(f"Data folder not found: {d}", where=str(d), fix="pass the folder `edgetune data` wrote (train.jsonl, valid.jsonl)")
    found = {s: d / f"{s}.jsonl" for s in SPLITS if (d / f"{s}.jsonl").exists()}
    if "train" not in found:
        raise EdgetuneError(
            f"{d} has no train.jsonl.", where=str(d), fix="prepare the data with `edgetune data PATH -o FOLDER` (writes train/valid/test.jsonl)"
        )
    return found


def encode_split(path: Path, tokenizer, max_seq_len: int) -> tuple[list[TokenizedExample], int]:
    """Encode one split; returns (examples with at least one target token, number dropped)."""
    from ..data.template import encode_example

    examples, dropped = [], 0
    for lineno, row in enumerate(read_jsonl(path), 1):
        try:
            enc = encode_example(tokenizer, row, max_seq_len=max_seq_len, truncate=True)
        except EdgetuneError as exc:
            if not exc.where:
                exc.where = f"{path}:{lineno}"
            raise
        ex = TokenizedExample(list(enc.input_ids), list(enc.loss_mask))
        if len(ex.ids) < 2 or ex.n_target == 0:
            dropped += 1  # nothing to learn (e.g. the completion was truncated away)
            continue
        examples.append(ex)
    return examples, dropped


def _pack_rows(order: list[TokenizedExample], max_len: int, window: int = 64) -> list[list[TokenizedExample]]:
    """First-fit packing into rows of ``max_len`` tokens, scanning the last ``window`` open rows."""
    rows: list[list[TokenizedExample]] = []
    room: list[int] = []
    for ex in order:
        n = len(ex.ids)
        start = max(0, len(rows) - window)
        for i in range(start, len(rows)):
            if room[i] >= n:
                rows[i].append(ex)
                room[i] -= n
                break
        else:
            rows.append([ex])
            room.append(max_len - n)
    return rows


def _collate(rows: list[list[TokenizedExample]], pad_id: int, multiple: int = 8) -> Batch:
    import numpy as np

    width = max(sum(len(e.ids) for e in r) for r in rows)
    width = -(-width // multiple) * multiple  # round up: fewer distinct shapes, same real tokens
    B = len(rows)
    ids = np.full((B, width), pad_id, dtype=np.int64)
    labels = np.full((B, width), IGNORE, dtype=np.int64)
    pos = np.zeros((B, width), dtype=np.int64)
    n_tok = n_tgt = 0
    for b, row in enumerate(rows):
        t = 0
        for ex in row:
            n = len(ex.ids)
            a = np.asarray(ex.ids, dtype=np.int64)
            m = np.asarray(ex.mask, dtype=bool)
            ids[b, t : t + n] = a
            pos[b, t : t + n] = np.arange(n)
            lab = np.where(m[1:], a[1:], IGNORE)
            labels[b, t : t + n - 1] = lab
            n_tok += n
            n_tgt += int(m[1:].sum())
            t += n
        if t < width:  # padding is its own "sequence" (positions restart) and carries no loss
            pos[b, t:] = np.arange(width - t)
    return Batch(ids, labels, pos, n_tok, n_tgt)


def plan_epoch(
    examples: list[TokenizedExample],
    *,
    batch_size: int,
    max_seq_len: int,
    packing: bool,
    group_by_length: bool,
    pad_id: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[Batch]:
    """All batches of one epoch, a pure function of its arguments."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(examples)
    if shuffle:
        rng.shuffle(order)
    if packing:
        rows = _pack_rows(order, max_seq_len)
        if shuffle:
            rng.shuffle(rows)
        groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    else:
        groups = _batch_groups([[e] for e in order], batch_size, group_by_length, shuffle, rng, lambda r: len(r[0].ids))
    return [_collate(g, pad_id) for g in groups if g]


def _batch_groups(items: list, batch_size: int, group_by_length: bool, shuffle: bool, rng: random.Random, length) -> list[list]:
    """``items`` (already in epoch order) cut into batches; with ``group_by_length`` sorted by
    ``length`` within chunks of 50 batches first (similar lengths share a batch) and the batches
    shuffled, so the order stays random."""
    if group_by_length:
        chunk = batch_size * 50
        items = [x for i in range(0, len(items), chunk) for x in sorted(items[i : i + chunk], key=length)]
    groups = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if shuffle and group_by_length:
        rng.shuffle(groups)
    return groups


def padding_fraction(batches: list[Batch]) -> float:
    slots = sum(b.n_slots for b in batches)
    return 1.0 - sum(b.n_tokens for b in batches) / slots if slots else 0.0


def lr_lambda(total: int, warmup: int, kind: str):
    def f(step: int) -> float:  # step = number of scheduler steps already taken
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# --- preference pairs (dpo, orpo) -----------------------------------------------------------------


@dataclass
class PairExample:
    """One preference example: the prompt + chosen and the prompt + rejected sequences."""

    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def ids(self) -> list[int]:  # the longer branch: what sizing and length grouping look at
        return max(self.chosen.ids, self.rejected.ids, key=len)


@dataclass
class PairBatch:
    """B pairs as 2B padded rows: rows ``[:B]`` are the chosen sequences, ``[B:]`` the rejected ones.

    ``n_target`` counts pairs (the DPO/ORPO losses are per pair); ``n_completion`` the scored tokens.
    """

    input_ids: np.ndarray  # [2B, L]
    labels: np.ndarray  # [2B, L] shifted, IGNORE on prompt tokens, the last token and padding
    position_ids: np.ndarray  # [2B, L]
    n_tokens: int
    n_target: int  # pairs
    n_completion: int = 0

    @property
    def n_slots(self) -> int:
        return int(self.input_ids.size)


def encode_pairs(path: Path, tokenizer, max_seq_len: int | None) -> tuple[list[PairExample], int]:
    """Encode a prepared preference split; a pair whose chosen or rejected has no scored token is dropped."""
    from ..data.template import encode_preference

    examples, dropped = [], 0
    for lineno, row in enumerate(read_jsonl(path), 1):
        if "chosen" not in row or "rejected" not in row:
            raise EdgetuneError(
                "DPO/ORPO train on preference rows (prompt/chosen/rejected); this row has none.",
                where=f"{path}:{lineno}", fix="prepare preference data with `edgetune data prepare`, or use --objective sft",
            )
        try:
            c, r = encode_preference(tokenizer, row, max_seq_len=max_seq_len)
        except EdgetuneError as exc:
            if not exc.where:
                exc.where = f"{path}:{lineno}"
            raise
        pair = PairExample(TokenizedExample(list(c.input_ids), list(c.loss_mask)),
                           TokenizedExample(list(r.input_ids), list(r.loss_mask)))
        if min(len(pair.chosen.ids), len(pair.rejected.ids)) < 2 or not pair.chosen.n_target or not pair.rejected.n_target:
            dropped += 1
            continue
        examples.append(pair)
    return examples, dropped


def plan_pairs(
    examples: list[PairExample],
    *,
    batch_size: int,
    max_seq_len: int,
    packing: bool,
    group_by_length: bool,
    pad_id: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[PairBatch]:
    """All pair batches of one epoch (padded, never packed), a pure function of its arguments."""
    if packing:
        raise EdgetuneError("Preference pairs are not packed.", fix="use --no-packing with --objective dpo/orpo")
    rng = random.Random(f"{seed}:{epoch}")
    order = list(examples)
    if shuffle:
        rng.shuffle(order)
    out = []
    for g in _batch_groups(order, batch_size, group_by_length, shuffle, rng, lambda p: len(p.ids)):
        if not g:
            continue
        b = _collate([[p.chosen] for p in g] + [[p.rejected] for p in g], pad_id)
        out.append(PairBatch(b.input_ids, b.labels, b.position_ids, b.n_tokens, len(g), b.n_target))
    return out
