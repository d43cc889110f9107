"""SFT: completion-only cross entropy (the prompt tokens of a chat never carry loss: data/template.py's masks).

A loss unit is a completion token; packed rows on torch (position ids restart per example), padded
length-grouped rows on MLX.
"""

from __future__ import annotations

from .. import batching
from . import Objective


def loss(kit, model, arrays):
    """Cross entropy summed over the batch's scored tokens (no metrics)."""
    return kit.completion_ce_sum(model, arrays), {}


OBJECTIVE = Objective(
    "sft",
    encode=batching.encode_split,
    plan=batching.plan_epoch,
    loss=loss,
    summary="completion-only cross entropy on the prepared chats",
    align=False,
)
