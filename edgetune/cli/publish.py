"""`edgetune publish RUN`: a folder ready to share (thin; the work is edgetune.publish.publish)."""

from __future__ import annotations

import json

import click

from .options import json_option


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", "out", type=click.Path(file_okay=False), default=None,
              help="Folder to write (default: RUN/publish). Replaced as a whole; a folder publish did not write is refused.")
@click.option("--force", is_flag=True,
              help="Publish a run with no eval report or with failed eval gates; the card says so at its top.")
@click.option("--ollama", "ollama_name", metavar="NAMESPACE/NAME[:TAG]", default=None,
              help="Then run `ollama create` and `ollama push` under this name (without ollama on PATH: print the commands).")
@click.option("--hf", "hf_dir", type=click.Path(file_okay=False), default=None,
              help="Also lay out a Hugging Face Hub repository in this folder (the same files + .gitattributes for LFS).")
@click.option("--upload", "repo_id", metavar="REPO_ID", default=None,
              help="With --hf: upload that folder to this Hub model repository (needs huggingface_hub, a token and network).")
@json_option
def publish(run_dir, out, force, ollama_name, hf_dir, repo_id, as_json):
    """Make a folder ready to share from the finished run RUN: its GGUFs, Modelfile, license, a model card
    (README.md) and SHA256SUMS.

    \b
        edgetune publish runs/quickstart
        edgetune publish runs/quickstart --out dist/support-triage
        edgetune publish runs/quickstart --ollama alice/support-triage:q4_k_m
        edgetune publish runs/quickstart --hf dist/hf --upload alice/support-triage-gguf

    A run with no eval report, or whose eval gates failed, is refused unless --force.
    """
    from ..console import console
    from ..console import out as stdout
    from ..publish import publish as run_publish

    def show(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    res = run_publish(run_dir, out, force=force, ollama=ollama_name, hf=hf_dir, upload=repo_id, log=show)
    if as_json:
        click.echo(json.dumps({"folder": str(res.folder), "files": res.files, "warnings": res.warnings,
                               "hf": str(res.hf_dir) if res.hf_dir else None, "ollama": res.ollama,
                               "uploaded": res.uploaded, "recorded_in": res.recorded_in}, indent=2))
        return
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    console.print(f"[green]published[/] {len(res.files)} files", highlight=False)
    stdout.print(str(res.folder), highlight=False, soft_wrap=True)
    if res.hf_dir:
        console.print(f"Hub repository layout: {res.hf_dir}", highlight=False, soft_wrap=True)
    if res.ollama and not res.ollama["ran"]:
        stdout.print("ollama is not on PATH; to publish to Ollama, run:", highlight=False)
        for cmd in res.ollama["commands"]:
            stdout.print(f"  {cmd}", highlight=False, markup=False, soft_wrap=True)
    elif res.ollama:
        console.print(f"[green]pushed[/] {res.ollama['name']}", highlight=False)
    if res.uploaded:
        console.print(f"[green]uploaded[/] {res.uploaded}", highlight=False, soft_wrap=True)
    console.print(f"recorded in {res.recorded_in}", highlight=False, soft_wrap=True)
