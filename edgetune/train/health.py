"""Training health: a non-finite step stops the run with nothing lost; a loss spike is warned.

**Non-finite steps.** Each backend checks the step's loss and gradient norm before the optimizer step
(torch: the total norm ``clip_grad_norm_`` computes, or ``get_total_norm`` with clipping off; MLX:
``optim.clip_grad_norm``'s, or the same sum of squares) and, when either is NaN or infinite, applies
nothing: no optimizer or scheduler step, the gradients dropped (:attr:`StepStats.finite` false).
The loop then stops with :class:`NonFiniteStep` naming the step, the values and the fixes, and writes
no checkpoint: ``checkpoints/last`` stays the last ``save_every`` save, written from a state whose
every step was finite. ``--resume`` continues from it, and may change ``learning_rate`` (the schedule
continues at the same position with the new peak). Under fp16 autocast with a GradScaler (CUDA),
inf/NaN gradients are the scaler's business (it skips that step and lowers its scale), so only a
non-finite loss stops the run there.

**Loss spikes.** A step's loss is a spike when at least :data:`SPIKE_MIN_HISTORY` steps came before it
and it is above ``spike_factor`` times the median of the previous :data:`SPIKE_WINDOW` step losses and
at least :data:`SPIKE_MIN_RISE` above that median (so a low, noisy loss late in training does not warn
on every wobble). The median is robust: a spike barely moves the baseline of the next steps.
Consecutive spike steps are one episode, warned once; each spike step's metrics row has
``spike: true`` and ``spike_baseline``; the result counts the episodes (``loss_spikes``). Objectives
whose loss is not a positive NLL-like number (GRPO's policy loss) are not checked.

**Test hook.** ``EDGETUNE_TEST_LOSS="STEP:VALUE[,STEP:VALUE...]"`` multiplies every micro-batch loss of
optimizer step STEP (1-based, as in metrics.jsonl) by VALUE (``nan``/``inf``: a non-finite loss, ``5``:
a spike); VALUE ``grad`` keeps the loss value and makes its gradient infinite. The tiny test models
do not reliably overflow with an absurd learning rate (their logits collapse to uniform instead), so
the tests use this; it goes through the backend's real checks.
"""

from __future__ import annotations

import math
import os
import statistics

from ..errors import EdgetuneError

SPIKE_WINDOW = 20  # steps in the baseline median
SPIKE_MIN_HISTORY = 5  # steps before the first check
SPIKE_MIN_RISE = 0.5  # nats (or the objective's loss unit) above the baseline, besides the factor
TEST_ENV = "EDGETUNE_TEST_LOSS"


class NonFiniteStep(EdgetuneError):
    """A step's loss or gradient norm was NaN/inf: the run stopped with that step not applied."""


def spike_baseline(losses: list[float]) -> float | None:
    """The median of the last :data:`SPIKE_WINDOW` losses; None before :data:`SPIKE_MIN_HISTORY` steps."""
    if len(losses) < SPIKE_MIN_HISTORY:
        return None
    return float(statistics.median(losses[-SPIKE_WINDOW:]))


def is_spike(losses: list[float], loss: float, factor: float) -> tuple[bool, float | None]:
    """(whether ``loss`` is a spike after ``losses``, the baseline it was compared with)."""
    base = spike_baseline(losses) if factor else None
    if base is None or base <= 0:
        return False, base
    return loss > factor * base and loss - base >= SPIKE_MIN_RISE, base


def spike_episodes(rows: list[dict]) -> int:
    """Runs of consecutive spike rows."""
    return sum(1 for i, r in enumerate(rows) if r.get("spike") and not (i and rows[i - 1].get("spike")))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def nonfinite_error(step: int, stats, *, cfg, precision: str, last_loss: float | None, checkpoint: dict | None,
                    longest_row: int | None, where: str) -> NonFiniteStep:
    """The error a non-finite step stops the run with: what, the likely causes, what to do."""
    bad = []
    if not math.isfinite(stats.loss):
        bad.append(f"loss is {stats.loss}")
    if stats.grad_norm is not None and not math.isfinite(stats.grad_norm):
        bad.append(f"gradient norm is {stats.grad_norm}")
    before = f" (step {step - 1}: loss {_fmt(last_loss)})" if last_loss is not None else ""
    msg = (f"Training stopped at step {step}: the {' and the '.join(bad)}{before}; the step's update was not "
           f"applied and no checkpoint was written. Likely causes: a learning rate too high for this model and "
           f"data (learning_rate {cfg.learning_rate:g}, {stats.lr:.3g} at this step)")
    if precision in ("bf16", "fp16"):
        msg += f"; {precision} overflow"
    msg += "; a very long or broken row in this step's batch"
    msg += f" (its longest row: {longest_row} tokens)." if longest_row else "."
    lower = f"--lr {cfg.learning_rate / 3:.2g}"
    if checkpoint:
        fix = (f"continue from checkpoints/last (step {checkpoint['step']}) with a lower rate: the same command "
               f"with --resume {lower}")
    else:
        fix = f"no checkpoint was saved yet (save_every {cfg.save_every}): start again with {lower}"
    if precision in ("bf16", "fp16"):
        fix += " and --precision fp32"
    fix += "; check the data's row lengths with `edgetune data validate DATA -m MODEL`"
    return NonFiniteStep(msg, where=where, fix=fix)


def test_faults() -> dict[int, str]:
    """``{step: value}`` from :data:`TEST_ENV` (empty when unset)."""
    raw = os.environ.get(TEST_ENV, "").strip()
    out: dict[int, str] = {}
    for item in filter(None, (x.strip() for x in raw.split(","))):
        step, _, value = item.partition(":")
        try:
            out[int(step)] = value if value == "grad" else str(float(value))
        except ValueError:
            raise EdgetuneError(f"{TEST_ENV}: {item!r} is not STEP:FACTOR or STEP:grad.") from None
    return out


def faulty(loss_fn, value: str, stop_gradient):
    """``loss_fn`` with its loss multiplied by ``value``, or (``grad``) an infinite gradient on an
    unchanged loss value: ``loss + sqrt(loss - sg(loss))`` is ``loss + 0`` with d sqrt(x)/dx = inf at 0."""

    def poisoned(model, arrays):
        loss, metrics = loss_fn(model, arrays)
        if value == "grad":
            return loss + (loss - stop_gradient(loss)) ** 0.5, metrics
        return loss * float(value), metrics

    return poisoned
