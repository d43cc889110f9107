"""`edgetune doctor`."""

from __future__ import annotations

import json

import click

from .options import json_option


@click.command()
@json_option
@click.option("--no-llama-check", is_flag=True, help="Skip running a batched prompt through llama.cpp.")
def doctor(as_json, no_llama_check):
    """Show what this machine can do (MLX/Metal, CUDA/bitsandbytes, llama.cpp, Ollama, disk,
    memory) and which training backend `auto` will choose, and why."""
    from ..doctor import collect, render

    info = collect(check_llama=not no_llama_check)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        render(info)
