"""``edgetune fuse``: merge an adapter into its base (thin; the work is edgetune.fuse.fuse)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import output_option


@click.command()
@click.option("--base", "base_dir", type=click.Path(file_okay=False), default=None,
              help="Base model folder (HF, bf16/fp16). Default: the adapter's base_model_name_or_path if it is a local folder, else the demo model.")
@click.option("--adapter", "adapter_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Adapter folder: PEFT (adapter_model.safetensors) or mlx-lm (adapters.safetensors); LoRA or DoRA.")
@click.option("--chat-template", default=None,
              help="Chat template for the fused model (file, family name or demo:FILE). Default: the one the adapter was trained "
                   "with (its chat_template.jinja), else the base's.")
@output_option(required=True, help_="Output folder for the fused HF model.")
def fuse(base_dir, adapter_dir, chat_template, output):
    """Merge an adapter into its base model and save a standard HF folder.

    The merge runs in numpy (no torch needed). A QLoRA adapter is merged into the original bf16
    base, never into 4-bit weights.
    """
    from ..console import console, out
    from ..errors import EdgetuneError
    from ..fuse import fuse as run_fuse
    from ..fuse import load_adapter
    from ..paths import demo_model_dir

    if base_dir is None:
        hint = load_adapter(adapter_dir).base_hint
        if hint and Path(hint).is_dir():
            base_dir = hint
        elif demo_model_dir().is_dir():
            base_dir = str(demo_model_dir())
        else:
            raise EdgetuneError(
                f"No base model given and the adapter's base ({hint}) is not a local folder.",
                where=str(Path(adapter_dir) / "adapter_config.json"),
                fix="pass --base BASE_DIR",
            )
    p = run_fuse(base_dir, adapter_dir, output, chat_template=chat_template)
    info = (p / "edgetune_fuse.json").read_text(encoding="utf-8")
    import json

    d = json.loads(info)
    kind = "DoRA" if d["dora"] else "LoRA"
    console.print(f"[green]fused[/] {d['adapter_format']} {kind} adapter ({d['merged_layers']} layers) into {base_dir}; "
                  f"chat template: {d['chat_template']}", highlight=False)
    out.print(str(p), highlight=False)
