"""`edgetune run`, `edgetune plan`, `edgetune quickstart`: the whole pipeline from one recipe."""

from __future__ import annotations

import time

import click

from ..console import console, out
from ..stages import STAGES, flow
from .options import force_option, json_option, target_options

STAGE_CHOICE = click.Choice(STAGES)


def _set_option(f):
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a recipe setting, e.g. --set train.iters=100 --set name=exp2 (repeatable).",
    )(f)


@click.command("run", help=f"""Run every stage of RECIPE (a YAML file or a shipped recipe name), skipping what is done.

{flow()} (what each does: `edgetune plan RECIPE`).
An interrupted run continues where it stopped when you run the same command again.
A run whose stages cannot fit in this machine's memory is refused before it starts
(see `edgetune plan RECIPE`; --force starts anyway).""")
@click.argument("recipe")
@_set_option
@click.option("--from", "from_stage", type=STAGE_CHOICE, default=None, help="Re-run this stage and every stage after it.")
@click.option("--to", "to_stage", type=STAGE_CHOICE, default=None, help="Stop after this stage.")
@force_option
def run(recipe, overrides, from_stage, to_stage, force):
    from .. import pipeline

    cfg = pipeline.load_recipe(recipe, list(overrides))
    t0 = time.time()
    result = pipeline.run(cfg, from_stage=from_stage, to_stage=to_stage, force=force)
    print_summary(result, time.time() - t0)


@click.command("quickstart")
@_set_option
@click.option("--from", "from_stage", type=STAGE_CHOICE, default=None, help="Re-run this stage and every stage after it.")
def quickstart(overrides, from_stage):
    """Run the shipped demo recipe on the demo model and demo data, end to end on CPU.

    Teaches SmolLM2-135M-Instruct to turn support messages into JSON, then prints where the
    GGUF and Modelfile are, the eval table (base vs tuned vs q4_k_m) and how to try it.
    """
    from .. import pipeline
    from ..paths import demo_model_dir

    cfg = pipeline.load_recipe("quickstart", list(overrides))
    if cfg.model == pipeline.DEMO and not (demo_model_dir() / "config.json").is_file():
        from ..demo_model import fetch_demo

        console.print(f"demo base model not found in {demo_model_dir()}; fetching it first")
        fetch_demo(None)
    t0 = time.time()
    result = pipeline.run(cfg, from_stage=from_stage)
    print_summary(result, time.time() - t0)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def print_summary(result, seconds: float) -> None:
    from rich.table import Table

    from ..runfolder import RunFolder

    st = result.stage
    done = result.ran + result.skipped
    out.print()
    out.print(f"[bold green]Done[/] in {seconds / 60:.1f} min — run folder [bold]{result.run_dir}[/]"
              + (f" (skipped, already done: {', '.join(result.skipped)})" if result.skipped else ""))
    gguf = st("export").get("gguf", {})
    for t, p in gguf.items():
        size = st("export").get("sizes_mb", {}).get(t)
        out.print(f"  GGUF {t:<7} {p}" + (f"  ({size} MB)" if size else ""))
    modelfile = st("ollama").get("modelfile")
    if modelfile:
        out.print(f"  Modelfile    {modelfile}  (template check: {st('ollama').get('check', '?')})")
    metrics = st("eval").get("metrics") or {}
    if metrics:
        cols = _metric_columns(metrics, st("eval").get("headline"))
        table = Table(title="eval on the held-out test split", title_justify="left")
        table.add_column("model", no_wrap=True)
        for _, header in cols:
            table.add_column(header, justify="right", no_wrap=True)
        for label, m in metrics.items():
            table.add_row(label, *[_fmt(m.get(k, "")) for k, _ in cols])
        out.print(table)
        if "eval" in done:
            out.print(f"  report: {result.run_dir / 'eval' / 'report.md'}")
    reg = st("register")
    if reg.get("ref"):
        out.print(f"  registry: {reg['ref']} → {reg['path']}" + ("" if reg.get("created", True) else " (already registered)"),
                  soft_wrap=True)
    run = RunFolder(result.run_dir, result.cfg)
    name = run.model_name
    if modelfile:
        import shlex

        prompt = run.sample_prompt()  # from this run's held-out data, so it speaks about the user's task
        out.print("\nTry it:")
        out.print(f"  ollama create {name} -f {modelfile}", soft_wrap=True)
        out.print(f"  ollama run {name}" + (f" {shlex.quote(prompt)}" if prompt else ""), soft_wrap=True)
    quant_path = gguf.get(st("ollama").get("gguf") and _quant_of(st("ollama")["gguf"], gguf)) if gguf else None
    if quant_path or gguf:
        target = quant_path or next(iter(gguf.values()))
        out.print(f"  edgetune chat {target}", soft_wrap=True)


def _quant_of(path: str, gguf: dict) -> str | None:
    for t, p in gguf.items():
        if p == path:
            return t
    return None


def _metric_columns(metrics: dict, headline: str | None) -> list[tuple[str, str]]:
    """(metric key, column header): the headline task metric, per-field scores, validity, speed."""
    from ..eval.report import short_name

    present: list[str] = []
    for m in metrics.values():
        present += [k for k in m if k not in present]
    want = [headline] if headline else []
    if headline:  # a thinking template: the same metric with thinking off, and how much the model reasoned
        want += [f"think_off.{headline}", "reasoning_chars"]
    want += [k for k in present if k.startswith("per_field.")]
    want += ["json_valid", "exact_match", "accuracy", "rouge_l", "regression.pass_rate", "tokens_per_s"]
    cols: list[tuple[str, str]] = []
    for k in want:
        if k and k in present and k not in [c[0] for c in cols]:
            cols.append((k, short_name(k)))
    return cols[:7]


@click.command("plan")
@click.argument("recipe")
@_set_option
@target_options
@json_option
def plan(recipe, overrides, target, target_memory, as_json):
    """Show what RECIPE would do (stages, backend, and each stage's peak memory, disk and time) and
    whether it fits this machine, or --target / --target-memory; nothing is loaded or written.

    \b
    Examples:
      edgetune plan mac-lora-7b --target mac-16gb
      edgetune plan cpu-lora-1b --target-memory 8GB
    """
    import json

    from rich.table import Table

    from .. import pipeline, stageplan

    cfg = pipeline.load_recipe(recipe, list(overrides))
    tgt = stageplan.resolve_target(target, target_memory)
    p = pipeline.plan(cfg, tgt)
    sp = p.stages_cost
    if as_json:
        out.print_json(json.dumps({"name": cfg.name, "model": cfg.model, "backend": p.backend, "notes": p.notes,
                                   "stages": [list(s) for s in p.stages], **(sp.as_dict() if sp else {})}))
        return
    out.print(f"[bold]{cfg.name}[/]: {cfg.model} → {cfg.run_dir}")
    t = Table(show_header=True, header_style="bold")
    for col, just in (("#", "right"), ("stage", "left"), ("does", "left"), ("status", "left")):
        t.add_column(col, justify=just)
    for i, (name, what, status) in enumerate(p.stages, 1):
        t.add_row(str(i), name, what, status)
    out.print(t)
    tr = cfg.train
    steps = f"{tr.iters} iterations" if tr.iters else f"{tr.epochs:g} epoch(s)"
    out.print(f"training: {tr.method}, rank {tr.rank}, lr {tr.learning_rate:g}, batch {tr.batch_size}×{tr.grad_accum}, "
              f"seq {tr.max_seq_len or 'from the data'}, {steps}")
    if p.backend:
        out.print(f"backend:  {p.backend} — {p.backend_reason}")
    if sp:
        print_stage_costs(sp)
    for n in p.notes:
        out.print(f"[yellow]note:[/] {n}")
    out.print(f"run it:   edgetune run {recipe}" + "".join(f" --set {o}" for o in overrides))


def print_stage_costs(sp) -> None:
    """The per-stage table of edgetune.stageplan: peak memory, disk, time, fit; then the fixes."""
    from rich.table import Table

    from ..stageplan import fmt_seconds

    tg = sp.target
    out.print(f"model:    {sp.params / 1e9:.2f}B parameters (shape from {sp.shape_source})")
    dev = {"mlx": "MLX (unified memory)", "cuda": "CUDA", "cpu": "CPU"}[tg.device]
    out.print(f"target:   {tg.name} — {tg.note}; training on {dev}, {tg.usable_gb:.1f} GB usable"
              + ("" if tg.device != "cuda" else f", {tg.host_usable_gb:.1f} GB host RAM for the other stages"))
    t = Table(show_header=True, header_style="bold", title="estimated cost per stage (an estimate: ±15% for training, "
              "conservative elsewhere)", title_justify="left")
    for col in ("stage", "peak memory", "disk", "time", "fits"):
        t.add_column(col, justify="right" if col in ("peak memory", "disk", "time") else "left", no_wrap=True)
    for c in sp.costs:
        fit = {True: "[green]yes[/]", False: f"[red]NO (> {c.limit_bytes / 1e9:.1f} GB)[/]", None: "?"}[c.fits]
        t.add_row(c.stage, f"{c.peak_gb:.2f} GB", f"{c.disk_bytes / 1e9:.2f} GB", fmt_seconds(c.seconds), fit)
    out.print(t)
    for c in sp.costs:
        out.print(f"  {c.stage:<8} peak: {c.how}", soft_wrap=True, highlight=False)
    disk = sum(c.disk_bytes for c in sp.costs)
    secs = [c.seconds for c in sp.costs if c.seconds is not None]
    out.print(f"total:    ~{disk / 1e9:.1f} GB of disk, ~{fmt_seconds(sum(secs))} (time from FLOPs / "
              f"{tg.gflops:,.0f} GFLOP/s training throughput: an estimate)")
    for c in sp.costs:
        if c.fits is False:
            out.print(f"[red]{c.stage} does not fit[/]: ~{c.peak_gb:.1f} GB needed, {c.limit_bytes / 1e9:.1f} GB usable. Fix: "
                      + "; or ".join(c.fixes or ["a machine with more memory"]), soft_wrap=True)
    if sp.fits:
        out.print("[green]every stage fits[/]")
