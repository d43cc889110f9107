"""Training objectives: one module per ``train.objective`` choice, each the only place that objective lives.

A module in this package that defines ``OBJECTIVE`` (an :class:`Objective`) is an objective; the
registry below finds it, so a new one (IPO, SimPO, KTO...) is one file. The module holds:

* its **maths**, written once for both frameworks against a :class:`Kit` (the few array operations
  and model calls an objective needs; ``torch_backend.TorchKit`` and ``mlx_backend.MLXKit``);
* its **data shape**: ``encode`` (a prepared split -> examples) and ``plan`` (examples -> one epoch's
  batches), plus ``sequences`` (rows per example) for sizing and memory;
* its **config fields** (:class:`Param`): added to ``TrainConfig`` (``edgetune.config``), given a CLI
  flag on ``edgetune train``, range-checked, and a row in the support table (``support.py``);
* its **memory term** (``reference_pass``) and optional hooks for objectives that generate (GRPO:
  ``start`` returns a session that samples completions before each step and validates by reward).

Contracts the shared loop (``loop.py``) relies on:

* ``encode(path, tokenizer, max_seq_len) -> (examples, n_dropped)``;
* ``plan(examples, *, batch_size, max_seq_len, packing, group_by_length, pad_id, seed, epoch,
  shuffle=True) -> list[batch]``, a pure function of its arguments (``--resume`` continues from a
  batch index). A batch carries numpy fields (the backend turns each into a framework array of the
  same name), ``n_tokens`` (throughput) and ``n_target`` (the units the loss is summed over);
* ``loss(kit, model, arrays, **params) -> (loss_sum, metrics)``: ``loss_sum`` summed over the
  batch's ``n_target`` units, ``metrics`` scalars also summed over them; the loop divides by the
  units of the whole step, so gradient accumulation weighs every unit the same;
* ``monitor`` / ``maximize``: the validation number that picks the best checkpoint and drives early stopping.

A backend supplies, through its kit: sequence and per-token log-probs of the scored tokens, the
reference switch (the same model with its adapter off: no second copy), and generation.
"""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass, field
from functools import partial
from importlib import import_module
from typing import Any


@dataclass(frozen=True)
class Param:
    """A ``TrainConfig`` field an objective owns: its default, range, flag help and type."""

    name: str
    default: Any
    help: str
    type: str = "float"  # the annotation written into TrainConfig (resolved in edgetune.config)
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    multiple: bool = False  # a repeatable flag (a list field)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Objective:
    name: str
    encode: Any  # (path, tokenizer, max_seq_len) -> (examples, n_dropped)
    plan: Any  # see the module docstring
    loss: Any  # (kit, model, arrays, **params) -> (loss_sum, metrics)
    summary: str = ""  # one line for --help and the README
    params: tuple[Param, ...] = ()  # config fields this objective owns
    uses: tuple[str, ...] = ()  # TrainConfig fields passed to ``loss`` as keywords (own or shared, e.g. beta)
    monitor: str = "loss"
    maximize: bool = False
    # the step loss is a positive, NLL-like number, so a step far above the recent ones is a spike
    # the loop warns about (train/health.py); GRPO's policy loss is centred on 0: no such baseline
    loss_spikes: bool = True
    sequences: Any = 1  # rows per example: an int or (cfg) -> int (DPO: 2, GRPO: num_generations)
    extra_tokens: Any = 0  # tokens a row holds beyond max_seq_len: int or (cfg) -> int (GRPO: completions)
    reference_pass: Any = False  # bool or (cfg) -> bool: a pass with the adapter off beside the policy's
    packable: bool = True  # examples may be packed into rows (torch); pairs and rollouts are padded
    preference: bool = False  # trains on prompt/chosen/rejected rows (data.format preference; eval preference accuracy)
    align: bool = True  # may be the align stage after SFT
    backends: tuple[str, ...] = ("torch", "mlx")
    start: Any = None  # (backend, tokenizer, cfg) -> session with .batches(data, n, step) and .evaluate(batches)
    check: Any = None  # (cfg, data_dir) -> None: refuse bad settings/data before any model loads
    defaults: dict = field(default_factory=dict)  # values for settings left unset (None), e.g. DPO's beta 0.1

    def loss_for(self, backend: str, cfg=None):
        """``loss(model, arrays)`` for ``backend``: the kit and ``uses`` bound (from ``cfg``)."""
        from ...errors import UnsupportedError

        if backend not in self.backends:
            raise UnsupportedError(
                f"train.objective = {self.name!r} is not implemented on the {backend} backend.",
                fix=f"use --backend {' or '.join(self.backends)}, or another objective",
            )
        kw = {p: getattr(cfg, p) for p in self.uses} if cfg is not None else {}
        return partial(self.loss, kit_for(backend), **kw)

    def rows_per_example(self, cfg) -> int:
        return int(self.sequences(cfg) if callable(self.sequences) else self.sequences)

    def tokens_beyond(self, cfg) -> int:
        return int(self.extra_tokens(cfg) if callable(self.extra_tokens) else self.extra_tokens)

    def has_reference_pass(self, cfg) -> bool:
        return bool(self.reference_pass(cfg) if callable(self.reference_pass) else self.reference_pass)


_KITS = {"torch": "edgetune.train.torch_backend:TorchKit", "mlx": "edgetune.train.mlx_backend:MLXKit"}


def kit_for(backend: str):
    module, name = _KITS[backend].split(":")
    return getattr(import_module(module), name)()


def _discover() -> dict[str, Objective]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        obj = getattr(import_module(f"{__name__}.{info.name}"), "OBJECTIVE", None)
        if isinstance(obj, Objective):
            found.append(obj)
    found.sort(key=lambda o: (o.name != "sft", o.name))  # sft first: the default
    return {o.name: o for o in found}


OBJECTIVES: dict[str, Objective] = _discover()


def params() -> list[Param]:
    """Every objective's config fields, once each (a field two objectives share is declared once)."""
    seen: dict[str, Param] = {}
    for o in OBJECTIVES.values():
        for p in o.params:
            seen.setdefault(p.name, p)
    return list(seen.values())


def get(name: str) -> Objective:
    from ...errors import EdgetuneError

    if name not in OBJECTIVES:
        raise EdgetuneError(f"Unknown objective {name!r}.", fix=f"use one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
