"""ORPO on preference pairs: no reference model.

Per pair: the mean NLL of the chosen completion tokens minus ``orpo_lambda * logsigmoid(log odds
ratio)``, the log odds taken on per-token AVERAGE log-probs (TRL's ORPOTrainer.odds_ratio_loss;
TRL calls lambda ``beta``).
"""

from __future__ import annotations

from . import Objective, Param
from .pairs import SHAPE, pair_logps, pair_metrics


def loss(kit, model, arrays, *, orpo_lambda: float = 0.1):
    pc, pr, nc, nr = pair_logps(kit, model, arrays)
    avg_c, avg_r = pc / kit.maximum(nc, 1.0), pr / kit.maximum(nr, 1.0)
    log_odds = (avg_c - avg_r) - (kit.log1mexp(avg_c) - kit.log1mexp(avg_r))
    per_pair = -avg_c - orpo_lambda * kit.logsigmoid(log_odds)
    rew_c, rew_r = kit.stop_gradient(orpo_lambda * avg_c), kit.stop_gradient(orpo_lambda * avg_r)
    return per_pair.sum(), pair_metrics(kit, pc, pr, rew_c, rew_r, nll=-avg_c, log_odds_ratio=log_odds)


OBJECTIVE = Objective(
    "orpo",
    loss=loss,
    summary="preference training with an odds-ratio term and no reference pass",
    params=(Param("orpo_lambda", 0.1, "ORPO: weight of the odds-ratio term", lo=0.0, hi=100.0),),
    uses=("orpo_lambda",),
    **SHAPE,
)
