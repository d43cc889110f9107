"""The edgetune command line.

The group imports a command's module only when that command runs, so ``edgetune --help`` is
instant and works without torch or mlx installed. Each command module is thin: it parses
options, calls a plain function of the library and prints the result.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from .. import __version__
from ..errors import EdgetuneError
from ..stages import flow

# command name -> (module, attribute, one-line help shown by --help without importing the module)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "doctor": ("edgetune.cli.doctor", "doctor", "Show what this machine can do and which backend 'auto' picks."),
    "data": ("edgetune.cli.data", "data", "Validate, clean, deduplicate and split training data."),
    "train": ("edgetune.cli.train", "train", "Fine-tune a base model with LoRA / DoRA / QLoRA."),
    "fuse": ("edgetune.cli.fuse", "fuse", "Merge an adapter into its base model (HF folder out)."),
    "export": ("edgetune.cli.export", "export", "Convert to GGUF, quantize, or export a GGUF LoRA adapter."),
    "ollama": ("edgetune.cli.ollama", "ollama", "Write (and check) an Ollama Modelfile for a GGUF."),
    "serve": ("edgetune.cli.serve", "serve", "Serve a GGUF over an OpenAI-compatible HTTP API."),
    "chat": ("edgetune.cli.serve", "chat", "Chat with a GGUF in the terminal."),
    "eval": ("edgetune.cli.eval", "eval_group", "Evaluate models side by side; measure quantization drift."),
    "run": ("edgetune.cli.run", "run", "Run every stage of a recipe YAML, skipping what is done."),
    "plan": ("edgetune.cli.run", "plan", "Show what a recipe would do on this machine, without doing it."),
    "quickstart": ("edgetune.cli.run", "quickstart", "Run the shipped demo recipe end to end."),
    "publish": ("edgetune.cli.publish", "publish", "Make a folder ready to share from a finished run (GGUFs, Modelfile, model card)."),
    "models": ("edgetune.cli.models", "models", "Fetch the demo model; import a GGUF or Ollama model; register a run; list, show and remove registered models."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            reason = str(exc)  # `exc` is unbound once the except block ends

            # A command whose module is missing or broken must not take --help down with it.
            @click.command(name, help=COMMANDS[name][2])
            def _unavailable():
                raise click.ClickException(f"'{name}' is unavailable: {reason}")

            return _unavailable

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             help=f"edgetune: from a dataset to a fine-tuned model you can run offline.\n\n{flow()} → serve")
@click.version_option(__version__, prog_name="edgetune")
def cli():
    pass


def main(argv=None):
    # transformers' "Loading weights" tqdm bars would interleave with our rich progress and tables
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # standalone_mode=False returns ctx.exit(n)'s code instead of exiting: pass it on.
        rc = cli.main(args=argv, prog_name="edgetune", standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except EdgetuneError as exc:
        from ..console import console

        console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.where:
            console.print(f"  [dim]where:[/] {exc.where}", highlight=False)
        if exc.fix:
            console.print(f"  [dim]fix:[/]   {exc.fix}", highlight=False)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
