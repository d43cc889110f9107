"""Training objectives: what a step optimises, as a table (one row per ``train.objective`` choice).

An objective is the part of training that is not the loop and not the framework: how a prepared
split becomes examples, how an epoch of examples becomes batches, and the loss on a batch, one
function per backend (imported only when that backend runs, so this module needs neither torch nor
mlx). The loop (``loop.py``) and the backends never name an objective; adding one (DPO, ORPO:
issue 13) is a new row here with its encoder, batch planner and losses.

Contracts (what ``loop.py`` relies on):

* ``encode(path, tokenizer, max_seq_len) -> (examples, n_dropped)``.
* ``plan(examples, *, batch_size, max_seq_len, packing, group_by_length, pad_id, seed, epoch,
  shuffle=True) -> list[batch]``: a pure function of its arguments (that is what lets ``--resume``
  continue from a batch index). A batch carries its arrays as numpy fields (the backend turns every
  ``np.ndarray`` field into a framework array under the same name), ``n_tokens`` (real tokens, for
  throughput) and ``n_target`` (the units the loss is summed over: completion tokens for SFT).
* a loss ``loss(model, arrays) -> (loss_sum, metrics)``: ``arrays`` maps the batch's field names to
  framework arrays; ``loss_sum`` is a scalar summed over the batch's ``n_target`` units; ``metrics``
  maps names to scalars also summed over those units (the loop logs their per-unit means, on train
  steps and on the valid split). The loop divides by the units of the whole step, so gradient
  accumulation and data parallelism weigh every unit the same.
* ``params``: ``TrainConfig`` fields passed to the loss as keyword arguments (DPO's ``beta``).
* ``monitor``: the validation number that picks the best checkpoint and drives early stopping
  (``"loss"`` or a metric name), ``maximize`` its direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import batching


@dataclass(frozen=True)
class Objective:
    name: str
    encode: object  # (path, tokenizer, max_seq_len) -> (examples, n_dropped)
    plan: object  # plan_epoch-like, see the module docstring
    losses: dict[str, str] = field(default_factory=dict)  # backend -> "module:function"
    params: tuple[str, ...] = ()  # TrainConfig fields the loss takes as keyword arguments
    monitor: str = "loss"
    maximize: bool = False

    def loss_for(self, backend: str, cfg=None):
        """The loss function of this objective for ``backend`` (imported here, lazily), with its
        ``params`` bound from ``cfg``."""
        from functools import partial
        from importlib import import_module

        from ..errors import UnsupportedError

        if backend not in self.losses:
            raise UnsupportedError(
                f"train.objective = {self.name!r} is not implemented on the {backend} backend.",
                fix=f"use --backend {' or '.join(sorted(self.losses))}, or another objective",
            )
        module, name = self.losses[backend].split(":")
        fn = getattr(import_module(module), name)
        if self.params and cfg is not None:
            fn = partial(fn, **{p: getattr(cfg, p) for p in self.params})
        return fn


OBJECTIVES: dict[str, Objective] = {
    # completion-only cross entropy: the prompt tokens of a chat never carry loss (data/template.py's masks)
    "sft": Objective(
        "sft",
        encode=batching.encode_split,
        plan=batching.plan_epoch,
        losses={"torch": "edgetune.train.torch_backend:sft_loss", "mlx": "edgetune.train.mlx_backend:sft_loss"},
    ),
    # preference pairs (prompt/chosen/rejected rows), padded 2B-row batches: chosen rows then rejected;
    # a loss unit is a pair; the torch and MLX losses are the same maths (tests/test_train_mlx_preference.py)
    # DPO, sigmoid loss; the reference is the same model with its adapter disabled (no second copy);
    # rpo_alpha > 0 adds that times the chosen answers' token-mean NLL (TRL: the "sft" loss_type)
    "dpo": Objective(
        "dpo",
        encode=batching.encode_pairs,
        plan=batching.plan_pairs,
        losses={"torch": "edgetune.train.torch_backend:dpo_loss", "mlx": "edgetune.train.mlx_backend:dpo_loss"},
        params=("beta", "rpo_alpha"),
        monitor="reward_accuracy",
        maximize=True,
    ),
    # ORPO: mean NLL of the chosen completion + orpo_lambda * odds-ratio term; no reference model
    "orpo": Objective(
        "orpo",
        encode=batching.encode_pairs,
        plan=batching.plan_pairs,
        losses={"torch": "edgetune.train.torch_backend:orpo_loss", "mlx": "edgetune.train.mlx_backend:orpo_loss"},
        params=("orpo_lambda",),
        monitor="reward_accuracy",
        maximize=True,
    ),
}


def get(name: str) -> Objective:
    from ..errors import EdgetuneError

    if name not in OBJECTIVES:
        raise EdgetuneError(f"Unknown objective {name!r}.", fix=f"use one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
