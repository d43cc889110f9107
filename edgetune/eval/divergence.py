"""How far one model's next-token logits are from another's: top-1 agreement, mean KL divergence,
max |Δlogit| (:func:`drift`), pooled over texts (:func:`combine`) and printed (:func:`drift_table`,
:func:`drift_text`).

The one measure of fidelity edgetune reports: ``eval drift``, the export stage's verification and
quant drift, ``--quant auto``, the adapter route and the imported/demo models' checks all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DriftRow:
    label: str
    positions: int
    top1: float  # fraction of positions whose argmax agrees
    mean_kl: float  # mean KL(ref || test) over positions, nats
    max_abs: float  # max |Δlogit| over all positions and vocab
    flips_outside_ties: int = 0  # top-1 disagreements where the reference margin is not a near-tie

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def drift(ref: np.ndarray, test: np.ndarray, label: str, near_tie: float = 0.0) -> DriftRow:
    """Compare two [positions, vocab] logit arrays."""
    ref = ref.astype(np.float64)
    test = test.astype(np.float64)
    lp = ref - ref.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = test - test.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    a, b = ref.argmax(-1), test.argmax(-1)
    agree = a == b
    idx = np.arange(len(a))
    margin = ref[idx, a] - ref[idx, b]
    flips = int(((~agree) & (margin > near_tie)).sum())
    return DriftRow(label, len(a), float(agree.mean()), float(kl.mean()), float(np.abs(ref - test).max()), flips)


def combine(rows: list[DriftRow], label: str) -> DriftRow:
    n = sum(r.positions for r in rows)
    return DriftRow(
        label,
        n,
        sum(r.top1 * r.positions for r in rows) / n,
        sum(r.mean_kl * r.positions for r in rows) / n,
        max(r.max_abs for r in rows),
        sum(r.flips_outside_ties for r in rows),
    )


def drift_table(rows: list[DriftRow], title: str = "drift"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("model", "positions", "top-1 agree", "mean KL", "max |Δlogit|"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(r.label, str(r.positions), f"{r.top1:.1%}", f"{r.mean_kl:.5f}", f"{r.max_abs:.4f}")
    return t


def drift_text(rows: list[DriftRow]) -> str:
    lines = [f"{'model':<28} {'positions':>9} {'top-1':>7} {'mean KL':>10} {'max|Δlogit|':>12}"]
    for r in rows:
        lines.append(f"{r.label:<28} {r.positions:>9} {r.top1:>7.1%} {r.mean_kl:>10.5f} {r.max_abs:>12.4f}")
    return "\n".join(lines)
