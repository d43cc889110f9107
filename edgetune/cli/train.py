"""`edgetune train`: fine-tune a base model with LoRA / DoRA / QLoRA (thin wrapper over edgetune.train)."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, fields
from typing import get_args, get_type_hints

import click

from ..config import CHOICES, TrainConfig
from .options import force_option, json_option, model_option, output_option, seed_option, target_options


def _comma_list(ctx, param, value):
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def _repeated(ctx, param, value):
    return list(value) or None  # given no times: leave the recipe's list alone


def train_config_options(fn):
    """One option per ``TrainConfig`` field made with :func:`edgetune.config.flag` (objective settings
    included), in field order: the flag, help text and default come from the field; the type from its
    annotation; choices from ``CHOICES``. Every default is None so an unset flag leaves the recipe's value."""
    hints = get_type_hints(TrainConfig)
    opts = []
    for f in fields(TrainConfig):
        meta = f.metadata
        if "help" not in meta:
            continue
        name = meta["flag"] or "--" + f.name.replace("_", "-")
        decls = [name, *([meta["short"]] if meta["short"] else []), f.name]
        base = {a for a in get_args(hints[f.name]) if a is not type(None)} or {hints[f.name]}
        kind = next(iter(base))
        default = f.default if f.default is not MISSING else f.default_factory()
        help_ = meta["help"]
        if default not in (None, []) and "(default" not in help_:
            shown = ("on" if default else "off") if kind is bool else f"{default:g}" if isinstance(default, float) else default
            help_ = help_.rstrip(".") + f" (default {shown})."
        kw: dict = {"default": None, "help": help_}
        if kind is bool:
            decls[0] = f"{name}/--no-{name[2:]}"
        elif meta["comma"]:
            kw["callback"] = _comma_list
        elif meta["multiple"]:
            kw.update(multiple=True, callback=_repeated)
        elif f"train.{f.name}" in CHOICES:
            kw["type"] = click.Choice(CHOICES[f"train.{f.name}"])
        else:
            kw["type"] = {int: int, float: float}.get(kind, str)
        opts.append(click.option(*decls, **kw))
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.command("train")
@model_option()
@click.option("--data", "-d", "data_dir", type=click.Path(file_okay=False), required=True,
              help="Prepared data folder (train.jsonl, valid.jsonl) written by `edgetune data`.")
@output_option(help_="Run output folder (adapter/, checkpoints/, metrics.jsonl, loss.png, run.json).")
@click.option("--config", "-c", "recipe", type=click.Path(dir_okay=False), default=None,
              help="Recipe YAML (or a run folder's run.yaml): its `train:` section, model and data.chat_template are the starting point (flags win).")
@click.option("--section", default="train", show_default=True, metavar="train|align",
              help="Which training section of --config: `align` is the DPO/ORPO stage after SFT (train it on RUN/align/sft_model "
                   "with -d RUN/align/data, as `edgetune run` does).")
@train_config_options
@click.option("--chat-template", default=None, help="Template file or family name for models without one.")
@seed_option
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUTPUT from its last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the backend, max_seq_len, what a step holds, the epochs, a memory and time "
              "estimate and whether it fits (this machine, or --target / --target-memory); load no model.")
@target_options
@force_option
@json_option
def train(model, data_dir, output, recipe, section, chat_template, resume, dry_run, as_json, target, target_memory,
          force, **flags):
    """Fine-tune MODEL on prepared DATA; writes OUTPUT/adapter (PEFT format) and friends.

    \b
    Example:
      edgetune train -m models/base/smollm2-135m-instruct -d data/prepared -o runs/demo --iters 200
    """
    from ..config import load_config, override
    from ..console import out
    from ..paths import demo_model_dir

    if section not in ("train", "align"):  # the recipe sections that configure a training stage
        raise click.BadParameter(f"{section!r} is not a training section: use train or align", param_hint="--section")
    rc = load_config(recipe) if recipe else None
    cfg = (rc.align.train_config() if section == "align" else rc.train) if rc else TrainConfig()
    if rc and not model and rc.model:  # the recipe's base model (`demo` resolves like `edgetune run` does)
        from ..recipes import resolve_model

        model = str(resolve_model(rc.model))
    if rc and not chat_template:
        chat_template = rc.data.chat_template  # the template the data stage rendered with
    cfg = override(cfg, **flags)
    cfg.__post_init__()
    model = model or str(demo_model_dir())

    from ..train import preflight, sizing

    choice = preflight(model, data_dir, cfg)
    if dry_run or not force:
        from ..stageplan import fmt_seconds, resolve_target, train_cost

        cfg, plan = sizing.size(model, data_dir, cfg, choice.backend, chat_template=chat_template)
        tgt = resolve_target(target, target_memory)
        tokens = plan.steps * plan.tokens_per_step
        cost = train_cost(model, cfg, tgt, tokens)
        if not dry_run and not cost.fits:
            from ..errors import EdgetuneError

            raise EdgetuneError(
                f"Training needs ~{cost.peak_gb:.1f} GB ({cost.how}); {tgt.name} offers {cost.limit_bytes / 1e9:.1f} GB.",
                fix="; or ".join(cost.fixes[:3]) + " — or --force to try anyway")
    if dry_run:
        est = plan.memory
        if as_json:
            info = {"backend": choice.backend, "device": choice.device, "reason": choice.reason, **plan.as_dict(),
                    "plan": cost.as_dict()}
            out.print_json(json.dumps(info))
            return
        out.print(f"backend: {choice.backend} on {choice.device} ({choice.reason})")
        sizing.announce(plan, out)
        for k, v in est.items():
            out.print(f"  {k:20s} {v}")
        fit = "[green]fits[/]" if cost.fits else "[red]does NOT fit[/]"
        out.print(f"plan: ~{cost.peak_gb:.2f} GB peak vs {cost.limit_bytes / 1e9:.1f} GB usable on {tgt.name}: {fit}; "
                  f"~{fmt_seconds(cost.seconds)} for {tokens:,} tokens (an estimate from FLOPs)", soft_wrap=True)
        if not cost.fits:
            out.print("fix: " + "; or ".join(cost.fixes), soft_wrap=True)
        return

    from ..train import train as run_train

    result = run_train(model, data_dir, output, cfg, resume=resume, chat_template=chat_template)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under `accelerate launch` every process returns the same result: rank 0 reports it
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
    else:
        out.print(
            f"adapter: {result.adapter_dir}  steps {result.steps}  train loss {result.final_train_loss:.4f}"
            + (f"  best val {result.best_val_loss:.4f}" if result.best_val_loss is not None else "")
            + (f"  best {result.extra['monitor']} {result.extra['best_monitor']:.4f} ({result.adapter_from})"
               if "monitor" in result.extra else "")
            + f"  {result.tokens_seen} tokens in {result.wall_s:.1f}s"
            + (f"  [yellow]{result.loss_spikes} loss spike(s)[/]" if result.loss_spikes else "")
        )
