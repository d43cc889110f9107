"""DPO (sigmoid loss) on preference pairs; the reference is the model with its adapter disabled.

``-logsigmoid(beta * ((pc - rc) - (pr - rr)))`` per pair (p: policy, r: reference; c/r: chosen/
rejected summed log-probs of the answer tokens), implicit rewards ``beta * (policy - reference)`` as
TRL's DPOTrainer logs them. ``rpo_alpha > 0`` adds that times the NLL of the batch's chosen answers
(the mean over all their tokens, as TRL computes it) for each pair, so the loop's per-pair mean is
TRL's ``loss_type=["sigmoid", "sft"]`` loss (RPO).
"""

from __future__ import annotations

from . import Objective, Param
from .pairs import SHAPE, pair_logps, pair_metrics

BETA = Param("beta", None, "DPO: strength of the pull toward the reference (default 0.1); GRPO: the KL "
             "coefficient to the reference (default 0.0 = no reference pass)", type="float | None", lo=0.0, hi=100.0)


def loss(kit, model, arrays, *, beta: float | None = None, rpo_alpha: float = 0.0):
    beta = 0.1 if beta is None else beta
    pc, pr, nc, _ = pair_logps(kit, model, arrays)
    rc, rr, _, _ = pair_logps(kit, model, arrays, reference=True)
    per_pair = -kit.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    rew_c, rew_r = kit.stop_gradient(beta * (pc - rc)), kit.stop_gradient(beta * (pr - rr))
    if not rpo_alpha:
        return per_pair.sum(), pair_metrics(kit, pc, pr, rew_c, rew_r)
    nll = -pc.sum() / kit.maximum(nc.sum(), 1.0)
    return (per_pair.sum() + rpo_alpha * pc.shape[0] * nll,
            pair_metrics(kit, pc, pr, rew_c, rew_r, nll=-pc / kit.maximum(nc, 1.0)))


OBJECTIVE = Objective(
    "dpo",
    loss=loss,
    summary="preference training on prompt/chosen/rejected rows against the adapter-disabled model",
    params=(BETA, Param("rpo_alpha", 0.0, "DPO: add this times the NLL of the chosen answer (RPO; 0 = plain "
                        "DPO, 1.0 is the paper's)", lo=0.0, hi=100.0)),
    uses=("beta", "rpo_alpha"),
    reference_pass=True,
    defaults={"beta": 0.1},  # TRL DPOConfig.beta
    **SHAPE,
)
