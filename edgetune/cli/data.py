"""``edgetune data validate|prepare``: thin wrappers over :mod:`edgetune.data`."""

from __future__ import annotations

import json
import sys

import click

from ..config import CHOICES
from .options import json_option, model_option, output_option, seed_option

MAX_SHOWN = 50  # problem lines printed before "... and N more" (all of them are in --json / rejects)


def _common(f):
    f = click.option("--thinking", type=click.Choice(CHOICES["data.thinking"]), default=None,
                     help="Reasoning in the data: auto (thinking on for records with reasoning, off without), on, off "
                          "(drop reasoning), text (keep it as <think> text, for templates without a thinking block).")(f)
    f = click.option("--chat-template", default=None, help="Template file or family name (chatml, llama3, qwen3, …) for models without one.")(f)
    f = click.option("--max-seq-len", type=int, default=None, help="Token budget per example.")(f)
    f = click.option("--near-threshold", type=float, default=None, help="MinHash Jaccard threshold for near-duplicates (default 0.8).")(f)
    f = click.option("--dedup", type=click.Choice(CHOICES["data.dedup"]), default=None, help="Duplicate removal (default exact).")(f)
    f = click.option(
        "--format", "fmt", type=click.Choice(CHOICES["data.format"]),
        default=None, help="Force the input format (default: detected per record).",
    )(f)
    f = click.option("--config", "recipe", type=click.Path(dir_okay=False), default=None, help="Recipe YAML: read its data section and model.")(f)
    f = model_option(help_="Model folder whose tokenizer + chat template measure tokens. Default: the demo model if present.")(f)
    return f


def _resolve(recipe, model, **flags):
    from ..config import DataConfig, load_config, override
    from ..paths import demo_model_dir

    if recipe:
        from ..recipes import resolve_model

        rc = load_config(recipe)
        cfg, model = rc.data, model or (str(resolve_model(rc.model)) if rc.model else None)
    else:
        cfg = DataConfig()
    cfg = override(cfg, **flags)
    if model is None and demo_model_dir().exists():
        model = str(demo_model_dir())
    return cfg, model


def _mix_args(items) -> list[dict] | None:
    from ..errors import EdgetuneError

    out = []
    for item in items or ():
        path, sep, share = item.rpartition("=")
        try:
            out.append({"path": path, "share": float(share)})
        except ValueError:
            sep = ""
        if not sep or not path:
            raise EdgetuneError(f"--mix {item!r} is not PATH=SHARE.", fix="e.g. --mix general.jsonl=0.1")
    return out or None


@click.group()
def data():
    """Validate, clean, deduplicate and split training data."""


@data.command()
@click.argument("path", type=click.Path())
@_common
@json_option
def validate(path, model, recipe, fmt, dedup, near_threshold, max_seq_len, chat_template, thinking, as_json):
    """Read-only report on PATH (file, folder or save_to_disk dataset).

    Exit code 0: clean; 1: problems found (each named by file:line and field); 2: unreadable input.
    """
    from ..console import console, out
    from ..data import validate as run_validate

    cfg, model = _resolve(recipe, model, format=fmt, dedup=dedup, near_threshold=near_threshold,
                          max_seq_len=max_seq_len, chat_template=chat_template, thinking=thinking)
    rep = run_validate(path, cfg, model_dir=model)
    if as_json:
        out.print_json(json.dumps(rep.to_dict(), ensure_ascii=False))
    else:
        _print_report(rep, model, console, out)
    # sys.exit, not click's Exit: the top-level main runs click with standalone_mode=False, where
    # click swallows Exit's code into a return value.
    sys.exit(rep.exit_code)


def _print_report(rep, model, console, out):
    from rich.table import Table

    if rep.fatal:
        console.print(f"[bold red]unreadable:[/] {rep.fatal}", highlight=False, soft_wrap=True)
        return
    out.print(f"[bold]{rep.path}[/]: {rep.rows} rows, {rep.usable} usable", highlight=False, soft_wrap=True)
    if rep.formats:
        out.print("formats: " + ", ".join(f"{k} {v}" for k, v in rep.formats.items()), highlight=False, soft_wrap=True)
    if rep.problems:
        out.print(f"[bold red]{len(rep.problems)} problem(s)[/]: " + ", ".join(f"{k} {v}" for k, v in rep.problem_counts.items()), highlight=False, soft_wrap=True)
        for line in rep.problems[:MAX_SHOWN]:
            out.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
        if len(rep.problems) > MAX_SHOWN:
            out.print(f"  … and {len(rep.problems) - MAX_SHOWN} more (use --json for all)")
    else:
        out.print("[green]no record problems[/]")
    d = rep.duplicates
    out.print(f"duplicates ({d['mode']}): exact {d['exact']}, near {d['near']} ({d['rate']:.1%})", highlight=False, soft_wrap=True)
    if rep.tokens:
        t = rep.tokens
        table = Table("tokens", "p50", "p95", "max", "mean", f"> {rep.max_seq_len}", title=f"token lengths ({t.get('model')})")
        table.add_row(str(t.get("total", 0)), str(t.get("p50", "-")), str(t.get("p95", "-")), str(t.get("max", "-")),
                      str(t.get("mean", "-")), str(rep.overlength))
        out.print(table)
    elif model is None:
        out.print("[dim]no --model given: token statistics skipped[/]")
    for h in rep.hints:
        out.print(f"[yellow]hint:[/] {h}", highlight=False, soft_wrap=True)


@data.command()
@click.argument("path", type=click.Path())
@output_option(help_="Output folder for train/valid/test.jsonl, rejects.jsonl and data_card.json.")
@_common
@click.option("--valid-ratio", type=float, default=None, help="Share of records for validation (default 0.1).")
@click.option("--test-ratio", type=float, default=None, help="Share of records for test (default 0.1).")
@seed_option
@click.option("--group-by", default=None, help="Field that keeps a group (e.g. user_id) inside one split.")
@click.option("--redact-pii/--no-redact-pii", default=None, help="Replace emails, phones, cards, SSNs, IPs with placeholders.")
@click.option("--overlength", type=click.Choice(CHOICES["data.overlength"]), default=None, help="Examples longer than --max-seq-len.")
@click.option("--replay", type=float, default=None, metavar="SHARE",
              help="Against forgetting: this share of the train split is the base model's own answers to shipped "
                   "general prompts (generated once, cached), e.g. 0.15.")
@click.option("--mix", "mix", multiple=True, metavar="PATH=SHARE",
              help="Mix rows of PATH (chat or text) into the train split at SHARE, e.g. --mix general.jsonl=0.1 (repeatable).")
@json_option
def prepare(path, output, model, recipe, fmt, dedup, near_threshold, max_seq_len, chat_template, thinking,
            valid_ratio, test_ratio, seed, group_by, redact_pii, overlength, replay, mix, as_json):
    """Clean, deduplicate and split PATH into OUTPUT/{train,valid,test}.jsonl (mlx-lm layout).

    Every dropped record is in OUTPUT/rejects.jsonl with its file, line and reason;
    OUTPUT/data_card.json records sources, counts, dedup, splits, leakage and token stats.
    """
    from ..console import out
    from ..data import prepare as run_prepare

    cfg, model = _resolve(recipe, model, format=fmt, dedup=dedup, near_threshold=near_threshold,
                          max_seq_len=max_seq_len, chat_template=chat_template, valid_ratio=valid_ratio,
                          test_ratio=test_ratio, seed=seed, group_by=group_by, redact_pii=redact_pii,
                          overlength=overlength, thinking=thinking, replay=replay, mix=_mix_args(mix))
    card = run_prepare(path, output, cfg, model_dir=model)
    if as_json:
        out.print_json(json.dumps(card, ensure_ascii=False))
        return
    c, s = card["counts"], card["splits"]
    out.print(f"{c['rows_read']} rows read → {c['records_out']} records ({card['layout']} layout)", highlight=False, soft_wrap=True)
    out.print(f"splits: train {s['train']}, valid {s['valid']}, test {s['test']}", highlight=False, soft_wrap=True)
    if c["rejected"]:
        out.print(f"rejected {c['rejected']}: " + ", ".join(f"{k} {v}" for k, v in c["rejected_by_reason"].items())
                  + f"  (see {output}/rejects.jsonl)", highlight=False, soft_wrap=True)
    if card["cleaning"]["pii_redacted"]:
        out.print("PII redacted: " + ", ".join(f"{k} {v}" for k, v in card["cleaning"]["pii_redacted"].items()), highlight=False, soft_wrap=True)
    if card["tokens"]:
        t = card["tokens"]["per_split"]["train"]
        out.print(f"train tokens: {t.get('total', 0)} (p50 {t.get('p50', '-')}, p95 {t.get('p95', '-')}, max {t.get('max', '-')})", highlight=False, soft_wrap=True)
    if card.get("tools"):
        from ..data.tools import card_warnings

        tl = card["tools"]
        out.print(f"tools: {tl['records_with_tools']} records declare tools, {tl['tool_calls']} calls "
                  "(canonical form, see data_card.json 'tools')", highlight=False, soft_wrap=True)
        for w in card_warnings(tl):
            out.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if card.get("mix"):
        mx = card["mix"]
        out.print(f"mixed into train: {mx['train_rows'] - mx['task_train_rows']} rows ({100 * mx['mixed_share']:.1f}%): "
                  + ", ".join(f"{s['kind'] if s['kind'] == 'replay' else s['path']} {s['rows']}" for s in mx["sources"]),
                  highlight=False, soft_wrap=True)
    if card.get("thinking"):
        th = card["thinking"]
        out.print(f"reasoning: {th['records_with_reasoning']} records with, {th['records_without_reasoning']} without; "
                  f"thinking on {th['thinking_on']}, off {th['thinking_off']}"
                  + (f"; reasoning dropped from {th['reasoning_dropped']}" if th["reasoning_dropped"] else "")
                  + (f"; kept as text in {th['reasoning_as_text']}" if th["reasoning_as_text"] else ""),
                  highlight=False, soft_wrap=True)
    out.print(f"wrote {output}/data_card.json", highlight=False, soft_wrap=True)


@data.command("from-logs")
@click.argument("logs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False), help="Folder for sft.jsonl, pairs.jsonl, data_card.json.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Drop rows whose prompt is in this run's held-out splits (valid/test).")
@json_option
def from_logs_cmd(logs, output, run_dir, as_json):
    """Turn the team server's feedback and shadow logs (written with log_text) into SFT rows
    (corrections, answers rated up) and preference pairs (correction > original, the answer a
    reference check or a judge preferred > the other), PII redacted, deduplicated, held-out prompts dropped."""
    from pathlib import Path

    from ..console import out
    from ..data.from_logs import from_logs
    from ..runfolder import RunFolder

    held = [RunFolder(Path(run_dir)).split(s) for s in ("valid", "test")] if run_dir else None
    card = from_logs([Path(p) for p in logs], Path(output), held_out=held)
    if as_json:
        out.print_json(data=card)
        return
    out.print(f"{card['lines_read']} log lines -> {card['sft_rows']} SFT rows, {card['preference_pairs']} preference pairs "
              f"in {output}", highlight=False, soft_wrap=True)
    for sig, n in card["by_signal"].items():
        out.print(f"  {sig}: {n}", highlight=False)
    if card["dropped"]:
        out.print("dropped: " + ", ".join(f"{k} {v}" for k, v in card["dropped"].items()), highlight=False, soft_wrap=True)
    for line in card["unreadable"]:
        out.print(f"[yellow]skipped[/] {line}", highlight=False, soft_wrap=True)
    if card["unreadable_lines"] > len(card["unreadable"]):
        out.print(f"… and {card['unreadable_lines'] - len(card['unreadable'])} more unreadable lines", highlight=False)
