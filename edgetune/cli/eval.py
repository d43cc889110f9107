"""``edgetune eval`` (several models side by side) and ``edgetune eval drift``: thin wrappers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..config import CHOICES
from ..eval.runners import logit_kinds
from .options import json_option


def _load_cfg(recipe):
    from ..config import EvalConfig, load_config

    return load_config(recipe).eval if recipe else EvalConfig()


def _keep(ctx, param, value):
    """Keep an option's value in ``ctx.meta`` (options added without widening the command's signature)."""
    ctx.meta[param.name] = value


class _RunArgument(click.Group):
    """`edgetune eval RUN_DIR …` means `edgetune eval --run RUN_DIR …`."""

    def parse_args(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["--run", *args]
        return super().parse_args(ctx, args)


@click.group("eval", cls=_RunArgument, invoke_without_command=True)
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A run folder (also accepted as the first argument): its test split, base / tuned / quantized "
                   "models, eval settings and RUN/eval/ are the defaults.")
@click.option("--data", "data_path", type=click.Path(), default=None, help="Eval examples (JSONL etc.; last assistant turn = reference).")
@click.option("--model", "-m", "models", multiple=True, metavar="SPEC",
              help="[NAME=]hf:DIR[+adapter:DIR] | mlx:DIR[+adapter:DIR] | gguf:FILE[+adapter:LORA.gguf] | ollama:NAME | openai:[MODEL@]URL. Repeat to compare.")
@click.option("--output", "-o", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for report.json / report.md / report.html (default: eval-report, or RUN/eval).")
@click.option("--baseline", default=None, help="Model name (or spec) deltas and --max-regression compare against. Default: the first.")
@click.option("--metric", "metrics", multiple=True, help="Metric(s) to compute (default: chosen from the references).")
@click.option("--max-tokens", type=int, default=None, help="Generation budget per answer (default 256).")
@click.option("--temperature", type=float, default=None, help="0 = greedy (default).")
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Extra stop string (repeatable).")
@click.option("--limit", type=int, default=None, help="Evaluate at most N examples.")
@click.option("--regression/--no-regression", default=None, help="Also run the shipped general-capability set (default on).")
@click.option("--regression-file", multiple=True, type=click.Path(exists=True), expose_value=False, callback=_keep,
              help="Your own regression rows (messages + check, as the shipped set's): added to the regression set; "
                   "repeatable. With --no-regression: these files only.")
@click.option("--nll/--no-nll", default=None, help="Mean NLL / perplexity of references where the runner has logits (default on).")
@click.option("--schema", type=click.Path(dir_okay=False), default=None, help="JSON schema for json_schema (default: inferred).")
@click.option("--regex", default=None, help="Pattern for the regex metric.")
@click.option("--min", "mins", multiple=True, metavar="METRIC=VALUE", help="Gate: every non-baseline model must reach VALUE.")
@click.option("--max", "maxs", multiple=True, metavar="METRIC=VALUE",
              help="Gate for lower-is-better metrics: every non-baseline model must stay at or below VALUE (e.g. nll=1.2).")
@click.option("--max-regression", "max_reg", multiple=True, metavar="METRIC=DELTA", help="Gate: at most DELTA worse than the baseline.")
@click.option("--judge", default=None, metavar="SPEC", help="Pairwise LLM-as-judge vs the baseline, both orders (off by default).")
@click.option("--drift-reference", default=None, metavar="NAME", help="Also measure KL / top-1 drift of the other models vs NAME.")
@click.option("--n-ctx", type=int, default=None, help="llama.cpp context for gguf models (default 2048).")
@click.option("--batch-size", type=int, default=None, help="Generate N conversations at once where the runtime batches (hf).")
@click.option("--dtype", type=click.Choice(CHOICES["eval.dtype"]), default=None, help="hf runner dtype (default auto: what edgetune doctor shows for this device).")
@click.option("--chat-template", default=None, help="Template file or family for models without one.")
@click.option("--thinking", type=click.Choice(CHOICES["eval.thinking"]), default=None,
              help="Thinking templates: auto (default: the task set with thinking on, and again off as think_off.*, "
                   "when the template can switch), on, off, both. Metrics score the final answer.")
@click.option("--preference-data", type=click.Path(), default=None,
              help="Preference pairs (prompt/chosen/rejected): report each model's preference accuracy (chosen log-prob > "
                   f"rejected); runners with logits only ({', '.join(logit_kinds())}). Default with a run folder: its align test split.")
@click.option("--allow-overlap", is_flag=True, default=None,
              help="With a run folder and your own --data: evaluate even when rows duplicate the run's training split "
                   "(the overlap is reported); refused otherwise.")
@click.option("--config", "recipe", type=click.Path(dir_okay=False), default=None, help="Recipe YAML: read its eval section.")
@json_option
@click.pass_context
def eval_group(ctx, run_dir, data_path, models, out_dir, baseline, metrics, max_tokens, temperature, top_p, seed, stop, limit,
               regression, nll, schema, regex, mins, maxs, max_reg, judge, drift_reference, n_ctx, batch_size, dtype, chat_template,
               thinking, preference_data, allow_overlap, recipe, as_json):
    """Evaluate models side by side on the same examples; measure quantization drift.

    \b
    edgetune eval --data test.jsonl -m base=hf:models/base/x -m tuned=hf:models/base/x+adapter:runs/r/adapter \\
        -m q4=gguf:runs/r/gguf/model-q4_k_m.gguf --min json_fields=0.8 --max-regression regression.pass_rate=0.1
    edgetune eval runs/r --limit 20     (a run folder: base vs tuned vs its Modelfile's GGUF on its test split)

    Exit code 1 when a gate fails (the failing numbers are printed).
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..config import override
    from ..console import console, out
    from ..errors import EdgetuneError
    from ..eval import evaluate
    from ..eval.data import combine_regression
    from ..eval.gates import describe, parse_gate_args

    cfg = _load_cfg(recipe)
    runner_choice = train_data = None
    if run_dir:  # the run folder supplies what the flags do not
        from ..runfolder import RunFolder

        run = RunFolder.open(run_dir)
        cfg = cfg if recipe else run.cfg.eval
        # eval.data is the user's own file (evaluate names it if missing); else the run's test split
        data_path = data_path or cfg.data or str(run.require(run.split("test"), "data"))
        if Path(data_path).resolve() != run.split("test").resolve():  # a golden set of the user's: held out?
            train_data = run.split("train")
        if not models:
            run.require(run.fused_dir, "fuse")
            from ..runfolder import fitted_eval_specs

            specs, rows = fitted_eval_specs(run)
            models = tuple(f"{k}={v}" for k, v in specs.items())
            runner_choice = rows.as_dict()
            baseline = baseline or cfg.baseline or "base"  # what the run's eval stage compares against
        out_dir = out_dir or str(run.eval_dir)
        pref = run.preference_data
        preference_data = preference_data or (str(pref) if pref and pref.is_file() else None)
    out_dir = out_dir or "eval-report"
    data_path = data_path or cfg.data
    if not data_path:
        raise EdgetuneError("No eval data.", fix="pass --data test.jsonl, or a run folder")
    if not models:
        raise EdgetuneError("No models to evaluate.", fix="pass --model SPEC, e.g. -m hf:models/base/smollm2-135m-instruct")
    gates = {**cfg.gates, **parse_gate_args(mins, "--min")}
    max_regression = {**cfg.max_regression, **parse_gate_args(max_reg, "--max-regression")}
    max_values = {**cfg.max, **parse_gate_args(maxs, "--max")}
    regression = combine_regression(cfg.regression, regression, ctx.meta.get("regression_file", ()))
    cfg = override(cfg, metrics=list(metrics) or None, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                   seed=seed, stop=list(stop) or None, limit=limit, regression=regression, nll=nll, schema=schema,
                   regex=regex, judge=judge, drift_reference=drift_reference, n_ctx=n_ctx, batch_size=batch_size, dtype=dtype,
                   chat_template=chat_template, preference_data=preference_data, baseline=baseline, gates=gates, max_regression=max_regression, max=max_values,
                   thinking=thinking, allow_overlap=allow_overlap)
    report = evaluate(data_path, list(models), out_dir, cfg, baseline=cfg.baseline, runner_choice=runner_choice,
                      train_data=train_data)
    if as_json:
        out.print_json(json.dumps({"models": report["models"], "deltas": report["deltas"], "gates": report["gates"],
                                   "drift": report.get("drift")}, default=str))
    else:
        out.print(summary_table(report))
        console.print(f"report: {out_dir}/report.md, report.html, report.json")
    gates_res = report["gates"]
    if not gates_res["passed"]:
        console.print("[bold red]gate failed:[/]")
        for c in gates_res["failures"]:
            console.print(f"  {describe(c)}", highlight=False)
        sys.exit(1)


def summary_table(report: dict):
    from rich.table import Table

    from ..eval.report import fmt, fmt_delta, short_name

    head = report["headline"]
    keys = [head] + [k for k in ("json_valid", "accuracy", "macro_f1", "exact_match", "rouge_l", "nll", "ttft_s",
                                 "tokens_per_s", "regression.pass_rate", "preference.accuracy") if k != head]
    keys = [k for k in keys if any(k in m["metrics"] for m in report["models"])]
    t = Table(title=f"eval ({report['n_examples'].get('task', 0)} examples, baseline {report['baseline']})")
    t.add_column("model", no_wrap=True)
    for k in keys:
        t.add_column(short_name(k), justify="right", no_wrap=k == head)
    for m in report["models"]:
        d = report["deltas"].get(m["name"], {})
        cells = []
        for k in keys:
            c = fmt(k, m["metrics"].get(k))
            if k in d and k == head:
                c += f" ({fmt_delta(k, d[k])})"
            cells.append(c)
        t.add_row(m["name"], *cells)
    return t


@eval_group.command("drift")
@click.option("--reference", "-r", required=True, metavar="SPEC", help="Reference model, e.g. hf:runs/r/fused.")
@click.option("--candidate", "-c", "candidates", multiple=True, required=True, metavar="SPEC", help="Model(s) to compare, e.g. gguf:q4.gguf.")
@click.option("--data", "data_path", type=click.Path(), required=True, help="Examples whose reference answers are scored.")
@click.option("--limit", type=int, default=None, help="At most N examples.")
@click.option("--output", "-o", "out_file", type=click.Path(dir_okay=False), default=None, help="Write drift.json here.")
@click.option("--n-ctx", type=int, default=None)
@click.option("--dtype", type=click.Choice(CHOICES["eval.dtype"]), default="float32", show_default=True,
              help="hf reference dtype (float32 keeps the reference's own rounding out of the drift).")
@json_option
def drift_cmd(reference, candidates, data_path, limit, out_file, n_ctx, dtype, as_json):
    """Per-token KL divergence and top-1 agreement of CANDIDATE vs REFERENCE, teacher-forced over the
    reference answers: the standard measure of what quantization cost."""
    from rich.table import Table

    from ..config import EvalConfig, override
    from ..console import out
    from ..eval.data import load_examples
    from ..eval.drift import run_drift
    from ..io import write_json

    cfg = override(EvalConfig(), n_ctx=n_ctx, dtype=dtype, limit=limit)
    examples = load_examples(data_path, cfg.limit)
    res = run_drift(reference, list(candidates), examples, cfg)
    if out_file:
        write_json(out_file, res)
    if as_json:
        out.print_json(json.dumps(res))
        return
    t = Table(title=f"drift vs {res['reference']} ({len(examples)} examples)")
    for col in ("candidate", "tokens", "mean KL (nats)", "top-1 agreement", "max |Δlogit|"):
        t.add_column(col, justify="right" if col != "candidate" else "left")
    for name, d in res["candidates"].items():
        t.add_row(name, str(d["tokens"]), f"{d['kl']:.4f}", f"{100 * d['top1_agreement']:.1f}%", f"{d['max_abs_logit_diff']:.3f}")
    out.print(t)


@eval_group.command("shadow")
@click.argument("log_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--route", default=None, help="Only this route's records (default: all shadow records).")
@click.option("--judge", default=None, metavar="SPEC", help="Pairwise LLM judge of candidate vs primary (needs a log with prompts).")
@click.option("--output", "-o", "out_dir", type=click.Path(file_okay=False), default="shadow-report", show_default=True,
              help="Folder for shadow_report.json / shadow_report.md.")
@json_option
def shadow_cmd(log_path, route, judge, out_dir, as_json):
    """Compare primary and candidate on a team server's shadow log (LOG_PATH, JSONL): agreement,
    latency, tokens, task metrics where records carry a reference, judge verdicts when asked."""
    from ..console import console, out
    from ..eval.shadow import compare_shadow, to_markdown, write_shadow_report

    rep = compare_shadow(log_path, route=route, judge=judge)
    paths = write_shadow_report(rep, out_dir)
    if as_json:
        out.print_json(json.dumps(rep))
        return
    console.print(to_markdown(rep), highlight=False, soft_wrap=True)
    console.print(f"report: {paths['md']}", highlight=False)
