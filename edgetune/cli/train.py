"""`edgetune train`: fine-tune a base model with LoRA / DoRA / QLoRA (thin wrapper over edgetune.train)."""

from __future__ import annotations

import json
import os

import click

from ..config import CHOICES
from ..train.objectives import OBJECTIVES
from ..train.objectives import params as objective_params
from ..train.samples import SELECT_METRICS
from .options import force_option, json_option, model_option, output_option, seed_option, target_options


def objective_options(fn):
    """A flag for every objective setting, from the objective modules (train/objectives/*.py)."""
    for p in reversed(objective_params()):
        kind = {"int": int, "float": float}.get(p.type.split(" ")[0])
        if p.choices:
            kind = click.Choice(p.choices)
        default = "" if p.default is None else f" (default {p.default})"
        if p.multiple:
            flag = p.flag.rstrip("s") if p.flag.endswith("s") else p.flag
            fn = click.option(flag, p.name, multiple=True, default=None, help=p.help)(fn)
        else:
            fn = click.option(p.flag, p.name, type=kind, default=None, help=p.help + default)(fn)
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
@click.option("--backend", type=click.Choice(CHOICES["train.backend"]), default=None, help="Training backend.")
@click.option("--method", type=click.Choice(CHOICES["train.method"]), default=None, help="Fine-tuning method.")
@click.option("--objective", type=click.Choice(CHOICES["train.objective"]), default=None,
              help="What training optimises (torch and MLX): "
                   + "; ".join(f"{n} = {o.summary}" for n, o in OBJECTIVES.items()) + ".")
@objective_options
@click.option("--rank", "-r", type=int, default=None, help="LoRA rank.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (scale = alpha / rank).")
@click.option("--dropout", type=float, default=None, help="LoRA dropout.")
@click.option("--target-modules", default=None, help="Comma-separated linear layer names (default: all attention + MLP).")
@click.option("--lr", "learning_rate", type=float, default=None, help="Peak learning rate.")
@click.option("--lr-scheduler", type=click.Choice(CHOICES["train.lr_scheduler"]), default=None)
@click.option("--warmup-ratio", type=float, default=None)
@click.option("--epochs", type=float, default=None)
@click.option("--iters", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", "-b", type=int, default=None)
@click.option("--grad-accum", type=int, default=None)
@click.option("--max-seq-len", type=int, default=None,
              help="Row length in tokens (default: the train split's p99 rounded up to 64, capped by the model's context and 2048).")
@click.option("--packing/--no-packing", default=None,
              help="Padding-free packed batches (default: on with torch; MLX pads and refuses --packing).")
@click.option("--group-by-length/--no-group-by-length", default=None,
              help="Padded batches of similar lengths (default: on with MLX; needs --no-packing with torch).")
@click.option("--eval-every", type=int, default=None, help="Validation loss every N steps (0 = at the end only).")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps.")
@click.option("--early-stopping", "early_stopping_patience", type=int, default=None,
              help="Stop after N evaluations without improvement (the best adapter is kept).")
@click.option("--spike-factor", type=float, default=None,
              help="Warn when a step's loss exceeds this many times the median of the last 20 steps' (and is "
                   "0.5 above it); 0 = off (default 2). A NaN/inf loss or gradient always stops the run.")
@click.option("--sample-every", type=int, default=None,
              help="Every N steps (and at the last), greedy answers to a few valid prompts into OUTPUT/samples.jsonl "
                   "(default 0 = off).")
@click.option("--sample-prompts", type=int, default=None, help="Prompts --sample-every answers (default 3).")
@click.option("--sample-max-tokens", type=int, default=None, help="New tokens per sample answer (default 64).")
@click.option("--select-by", type=click.Choice(SELECT_METRICS), default=None,
              help="Pick the best checkpoint (and early-stop) by this task metric of greedy answers to the valid "
                   "split instead of the validation loss; needs --eval-every and --early-stopping.")
@click.option("--select-by-limit", type=int, default=None, help="Valid rows --select-by answers per evaluation (default 16).")
@click.option("--precision", type=click.Choice(CHOICES["train.precision"]), default=None,
              help="Compute dtype (default auto: edgetune.precision's choice for this device; see edgetune doctor).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--report-to", type=click.Choice(CHOICES["train.report_to"]), default=None)
@click.option("--threads", "num_threads", type=int, default=None, help="torch CPU threads (MLX refuses it).")
@click.option("--chat-template", default=None, help="Template file or family name for models without one.")
@seed_option
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUTPUT from its last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the backend, max_seq_len, what a step holds, the epochs, a memory and time "
              "estimate and whether it fits (this machine, or --target / --target-memory); load no model.")
@target_options
@force_option
@json_option
def train(model, data_dir, output, recipe, section, chat_template, resume, dry_run, as_json, target_modules,
          target, target_memory, force, **flags):
    """Fine-tune MODEL on prepared DATA; writes OUTPUT/adapter (PEFT format) and friends.

    \b
    Example:
      edgetune train -m models/base/smollm2-135m-instruct -d data/prepared -o runs/demo --iters 200
    """
    from ..config import TrainConfig, load_config, override
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
    for p in objective_params():
        if p.multiple:  # a repeatable flag given no times leaves the recipe's list alone
            flags[p.name] = list(flags.get(p.name) or ()) or None
    if target_modules:
        flags["target_modules"] = [t.strip() for t in target_modules.split(",") if t.strip()]
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
