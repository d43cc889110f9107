"""`edgetune ollama`: write (and check) an Ollama Modelfile for a GGUF."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from .options import json_option


class _DefaultToWrite(click.Group):
    """`edgetune ollama MODEL.gguf …` means `edgetune ollama write MODEL.gguf …`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["write", *args]
        return super().parse_args(ctx, args)


@click.group("ollama", cls=_DefaultToWrite)
def ollama():
    """Write (and check) an Ollama Modelfile for a GGUF.

    \b
      edgetune ollama MODEL.gguf --name NAME [--adapter A.gguf] [-o DIR] [--model-dir HF_DIR]
      edgetune ollama runs/NAME          (a run folder: its GGUF, fused model and settings)
      edgetune ollama check DIR/Modelfile --model-dir HF_DIR
      edgetune ollama check runs/NAME
    """


def _print_check(result, as_json: bool) -> None:
    from ..console import console, out

    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    table = Table(title=f"TEMPLATE vs chat template ({result.family or 'custom'})", show_lines=False)
    for col in ("conversation", "compared", "tokens/chars", "result"):
        table.add_column(col)
    style = {"identical": "green", "different": "bold red", "skipped": "yellow"}
    for c in result.conversations:
        table.add_row(c.name, c.compared if c.status != "skipped" else "-", str(c.n_tokens or "-"),
                      f"[{style[c.status]}]{c.status}[/]" + (f" ({c.reason})" if c.reason else ""))
    console.print(table)
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)
    if result.diff:
        console.print(result.diff, highlight=False, markup=False)
    checked = sum(c.status != "skipped" for c in result.conversations)
    verdict = "[green]pass[/]" if result.ok else "[bold red]DIFFERENT[/]"
    console.print(f"{result.n_identical} of {checked} conversations token-identical → {verdict}")


def _default_name(gguf: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem).strip("-.").lower() or "model"


@ollama.command("write")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--name", "-n", help="Ollama model name (default: from the GGUF file name).")
@click.option("--adapter", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="LoRA adapter GGUF: MODEL is then the base GGUF and the Modelfile gets an ADAPTER line.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the Modelfile (default: the GGUF's folder).")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="HF folder the model came from (chat template, tokenizer, generation config, license). "
                   "Default: the GGUF's own metadata.")
@click.option("--system", help="SYSTEM prompt (default: the training data's dominant system prompt, if --data is given).")
@click.option("--data", "train_data", type=click.Path(exists=True, path_type=Path),
              help="Training data JSONL: its most common system prompt becomes SYSTEM unless --system is given.")
@click.option("--template", "template_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Go template file, for a chat template edgetune does not recognise (it is still checked).")
@click.option("--temperature", type=float)
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--repeat-penalty", type=float)
@click.option("--num-ctx", type=int, help="Context window (default: the model's, capped at 8192).")
@click.option("--no-check", is_flag=True, help="Skip the TEMPLATE-vs-chat-template check.")
@click.option("--create/--no-create", default=None,
              help="Run `ollama create` and a smoke prompt when ollama is on PATH (default: off, or the run's ollama.create).")
@json_option
def write_cmd(model, name, adapter, output, model_dir, system, train_data, template_file, temperature, top_p, top_k,
              repeat_penalty, num_ctx, no_check, create, as_json):
    """Write DIR/Modelfile for MODEL.gguf whose TEMPLATE matches the model's chat template.

    MODEL may be a run folder: its Modelfile GGUF (ollama.quant), fused model, train split and
    ollama settings are the defaults, and the Modelfile goes to RUN/ollama/ (flags still win).
    """
    from ..config import OllamaConfig, override
    from ..console import console, out
    from ..io import write_text
    from ..ollama.modelfile import ModelfileOptions, build_modelfile
    from ..ollama_client import check_model_name, create_command, ollama_create
    from ..runfolder import RunFolder

    base_cfg, run, from_name = OllamaConfig(), None, None
    if model.is_dir():  # a run folder: its chosen GGUF, fused model, train split, ollama settings and RUN/ollama/
        run = RunFolder.open(model)
        base_cfg = run.cfg.ollama
        if run.adapter_route:  # FROM the source the base was imported from (its Ollama name) + ADAPTER
            from ..export.source_route import require_source

            src = require_source(run.base_model_dir)
            model, adapter = src.path, adapter or run.require(run.adapter_gguf, "export")
            from_name = src.ollama_name
        else:
            model = run.require(run.gguf(run.modelfile_quant), "export")
        name, output = name or run.model_name, output or run.ollama_dir
        model_dir = model_dir or run.require(run.fused_dir, "fuse")
        train_data = train_data or (run.split("train") if run.split("train").is_file() else None)
    cfg = override(base_cfg, name=name, system=system, template=str(template_file) if template_file else None,
                   temperature=temperature, top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, num_ctx=num_ctx,
                   create=create, check=False if no_check else None)
    name = check_model_name(cfg.name or _default_name(model))
    out_dir = output or model.parent
    options = ModelfileOptions.from_config(cfg, model_dir=model_dir, adapter_gguf=adapter, train_data=train_data,
                                           from_name=from_name)
    text, result = build_modelfile(model, out_dir, name, options)
    path = write_text(Path(out_dir) / "Modelfile", text)

    def created_cmd(name, path):
        import shlex

        return shlex.join(create_command(name, path))
    prompt = run.sample_prompt() if run else None  # a run folder's own held-out prompt for the smoke chat
    created = (ollama_create(path, name, **({"prompt": prompt} if prompt else {})) if cfg.create else None)
    if as_json:
        payload = {"modelfile": str(path), "name": name, "check": result.to_dict() if result else None}
        if created:
            payload["create"] = created.__dict__
        out.print_json(json.dumps(payload))
        return
    if result:
        _print_check(result, False)
    console.print(f"[bold]wrote[/] {path}", highlight=False, soft_wrap=True)
    if created is None:
        console.print(f"create it with: {created_cmd(name, path)}", highlight=False, soft_wrap=True)
    elif not created.ran:
        console.print(created.message, highlight=False, soft_wrap=True)
    else:
        speed = f" ({created.tokens_per_s:.1f} tokens/s)" if created.tokens_per_s else ""
        console.print(f"{created.message}; smoke prompt answer{speed}:\n{created.answer}", highlight=False)


@ollama.command("check")
@click.argument("modelfile", type=click.Path(exists=True, path_type=Path))
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="HF folder the model was trained from (default: the chat template in the FROM GGUF).")
@json_option
def check_cmd(modelfile, model_dir, as_json):
    """Render the Modelfile's TEMPLATE for a set of chats and compare with the chat template (exit 1 if they differ)."""
    from ..ollama.check import check_modelfile
    from ..runfolder import RunFolder

    if modelfile.is_dir():  # a run folder: RUN/ollama/Modelfile against RUN/fused
        run = RunFolder.open(modelfile)
        modelfile, model_dir = run.require(run.modelfile, "ollama"), model_dir or run.fused_dir
    result = check_modelfile(modelfile, model_dir)
    _print_check(result, as_json)
    if not result.ok:
        from ..errors import EdgetuneError

        raise EdgetuneError("The Modelfile's TEMPLATE does not render the chat template's prompts (diff above).",
                            where=str(modelfile), fix="rewrite it with 'edgetune ollama MODEL.gguf' or fix the TEMPLATE")
