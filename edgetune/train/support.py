"""Which ``TrainConfig`` settings each backend honours: one row per field, nothing silently ignored.

Every field of ``TrainConfig`` has a row (a test walks the dataclass and fails on a missing one).
A cell is either a string saying where the setting takes effect, or a :class:`Refuse` rule naming
the values that backend cannot honour. ``resolve(cfg, backend)`` fills the settings left at ``None`` ("the backend's
default") with that backend's value, so the loop and the checkpoints see concrete values, and raises
a clear error (field, backend, fix) for a refused value before any model loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UnsupportedError

BACKENDS = ("torch", "mlx")


@dataclass(frozen=True)
class Refuse:
    """Values of a field that a backend refuses: ``when(value, cfg)`` true -> error with ``why`` and ``fix``."""

    when: object
    why: str
    fix: str
    honoured: str = ""  # what the other values do on this backend


LOOP = "the shared loop (loop.py)"


def _objective_rows() -> dict[str, dict[str, object]]:
    """A row per objective setting, from the objective modules that declare it (train/objectives/)."""
    from .objectives import OBJECTIVES

    rows: dict[str, dict[str, object]] = {}
    for o in OBJECTIVES.values():
        for p in o.params:
            users = [x.name for x in OBJECTIVES.values() if p.name in x.uses or p in x.params]
            where = f"objectives/{'+'.join(users)}.py ({p.help.split(':')[0]}); unused by the other objectives"
            rows.setdefault(p.name, {b: where for b in BACKENDS})
    return rows


def _unpackable() -> tuple[str, ...]:
    from .objectives import OBJECTIVES

    return tuple(n for n, o in OBJECTIVES.items() if not o.packable)

# field -> {backend: where it is honoured | Refuse(...)}
SUPPORT: dict[str, dict[str, object]] = {
    "backend": {"torch": "select.choose_backend", "mlx": "select.choose_backend"},
    "objective": {"torch": "train/objectives/ (one module each; the loss through torch_backend.TorchKit)",
                  "mlx": "train/objectives/ (one module each; the loss through mlx_backend.MLXKit)"},
    **_objective_rows(),
    "method": {
        b: Refuse(lambda v, c: v == "full", "full fine-tuning is not implemented yet",
                  "use --method lora or dora (fuse merges the adapter into a full model afterwards)",
                  honoured="PEFT LoRA/DoRA, QLoRA = bitsandbytes NF4 on CUDA" if b == "torch"
                  else "mlx-lm LoRA/DoRA layers, QLoRA = 4-bit quantized base")
        for b in BACKENDS
    },
    "rank": {"torch": "LoraConfig.r", "mlx": "lora_parameters.rank"},
    "alpha": {"torch": "LoraConfig.lora_alpha", "mlx": "lora_parameters.scale = alpha / rank"},
    "dropout": {"torch": "LoraConfig.lora_dropout (FastDropout on CPU)", "mlx": "lora_parameters.dropout"},
    "target_modules": {"torch": "LoraConfig.target_modules", "mlx": "lora_parameters.keys"},
    "learning_rate": {"torch": "AdamW lr", "mlx": "AdamW learning_rate"},
    "lr_scheduler": {"torch": "LambdaLR(batching.lr_lambda)", "mlx": "batching.lr_lambda per step"},
    "warmup_ratio": {"torch": LOOP, "mlx": LOOP},
    "epochs": {"torch": LOOP, "mlx": LOOP},
    "iters": {"torch": LOOP, "mlx": LOOP},
    "batch_size": {"torch": LOOP, "mlx": LOOP},
    "grad_accum": {"torch": "micro-batches per step (x processes)", "mlx": "micro-batches per step"},
    "max_seq_len": {"torch": LOOP, "mlx": LOOP},
    "seed": {"torch": "python/numpy/torch RNGs, batch order", "mlx": "mx.random per step, batch order"},
    "max_grad_norm": {"torch": "clip_grad_norm_", "mlx": "optim.clip_grad_norm"},
    "weight_decay": {"torch": "AdamW weight_decay", "mlx": "AdamW weight_decay"},
    "packing": {
        "torch": Refuse(lambda v, c: v is True and c.objective in _unpackable(), "this objective's batches are "
                        "padded (preference pairs side by side, GRPO's sampled groups); packing them is not implemented",
                        "drop --packing (or set train.packing: false) with --objective " + "/".join(_unpackable()),
                        honoured="batching.plan_epoch (position ids restart per example); default on for sft"),
        "mlx": Refuse(lambda v, c: v is True, "mlx-lm models take no position ids, so examples packed into "
                      "one row would attend to each other", "leave train.packing unset or use --no-packing",
                      honoured="padded batches (the default)"),
    },
    "group_by_length": {
        b: Refuse(lambda v, c: v is True and c.packing is True, "group_by_length orders padded batches; "
                  "packed rows have no padding to save", "use --no-packing with it, or drop --group-by-length",
                  honoured="batching.plan_epoch / plan_pairs; default " + ("off" if b == "torch" else "on"))
        for b in BACKENDS
    },
    "eval_every": {"torch": LOOP, "mlx": LOOP},
    "save_every": {"torch": LOOP, "mlx": LOOP},
    "early_stopping_patience": {"torch": LOOP, "mlx": LOOP},
    "precision": {"torch": "autocast dtype + frozen-weight dtype (edgetune.precision for auto)",
                  "mlx": "base weights cast with set_dtype (auto: the saved dtype); LoRA weights stay fp32"},
    "gradient_checkpointing": {"torch": "model.gradient_checkpointing_enable", "mlx": "mx.checkpoint per layer"},
    "report_to": {"torch": LOOP, "mlx": LOOP},
    "spike_factor": {"torch": LOOP + " and health.py", "mlx": LOOP + " and health.py"},
    **{name: {b: LOOP + " and samples.py (greedy answers through the backend's generate)" for b in BACKENDS}
       for name in ("sample_every", "sample_prompts", "sample_max_tokens", "select_by", "select_by_limit")},
    "num_threads": {
        "torch": "torch.set_num_threads",
        "mlx": Refuse(lambda v, c: v is not None, "MLX has no setting for its CPU thread count",
                      "leave train.num_threads unset (or drop --threads) with --backend mlx"),
    },
}

# the values a ``None`` setting takes on each backend
DEFAULTS: dict[str, dict[str, object]] = {
    "torch": {"packing": True, "group_by_length": False},
    "mlx": {"packing": False, "group_by_length": True},
}


def _fill(cfg, backend: str):
    from .objectives import get

    objective = get(cfg.objective)
    defaults = {**DEFAULTS[backend], **objective.defaults}
    if not objective.packable:
        defaults["packing"] = False  # pairs and sampled groups are padded batches
    given = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **given) if given else cfg


def resolve(cfg, backend: str):
    """``cfg`` with its backend-default (None) settings filled in; raises :class:`UnsupportedError`
    for the first setting ``backend`` cannot honour (checked on the filled-in values)."""
    cfg = _fill(cfg, backend)
    from .objectives import get

    if backend not in get(cfg.objective).backends:
        get(cfg.objective).loss_for(backend)  # raises, naming the backends that have it
    for name, row in SUPPORT.items():
        rule = row[backend]
        if isinstance(rule, Refuse) and rule.when(getattr(cfg, name), cfg):
            raise UnsupportedError(
                f"train.{name} = {getattr(cfg, name)!r} is not supported on the {backend} backend: {rule.why}.",
                fix=rule.fix,
            )
    return cfg
