"""What the preference objectives (DPO, ORPO, and any new pair objective) share: the data shape,
the pair log-probs, and the metrics they log. Not an objective itself (no ``OBJECTIVE``).

A pair batch is 2B padded rows: the B chosen sequences, then the B rejected ones; a loss unit is a
pair. The reference (DPO) is the same model with its adapter disabled (no second copy).
"""

from __future__ import annotations

from .. import batching

ENCODE, PLAN = batching.encode_pairs, batching.plan_pairs
SHAPE = dict(encode=ENCODE, plan=PLAN, sequences=2, packable=False, preference=True, monitor="reward_accuracy",
             maximize=True)


def pair_logps(kit, model, arrays: dict, reference: bool = False):
    """(chosen sums, rejected sums, chosen counts, rejected counts) of the scored tokens; ``reference``:
    the adapter-disabled model, gradient stopped."""
    sums, counts = kit.seq_logps(model, arrays, reference=reference)
    b = sums.shape[0] // 2
    return sums[:b], sums[b:], counts[:b], counts[b:]


def pair_metrics(kit, pc, pr, rew_c, rew_r, **extra) -> dict:
    """The metrics every pair objective logs (summed over pairs; the loop logs per-pair means)."""
    sg = kit.stop_gradient
    return {"reward_margin": sg(rew_c - rew_r).sum(), "reward_accuracy": kit.to_float(rew_c > rew_r).sum(),
            "logps_chosen": sg(pc).sum(), "logps_rejected": sg(pr).sum(),
            **{k: sg(v).sum() for k, v in extra.items()}}
