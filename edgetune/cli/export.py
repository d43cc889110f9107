"""``edgetune export``: GGUF conversion, quantization, GGUF LoRA adapters (thin; work in edgetune.export)."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import CHOICES
from ..qtypes import QUANTS
from .options import output_option

QUANT_HELP = f"llama.cpp quant types, comma-separated or repeated: {', '.join(QUANTS)}."


def _split(values) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out += [x.strip() for x in str(v).split(",") if x.strip()]
    return out


def _print_verify(report) -> None:
    from ..console import console

    if report is None:
        return
    console.print(report.summary(), highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if report.rows:
        console.print(report.table())


def _print_drift(rows, title) -> None:
    from ..console import console
    from ..eval.divergence import drift_table

    if rows:
        console.print(drift_table(rows, title=title))


class ExportGroup(click.Group):
    """A group whose first argument may be a MODEL_DIR instead of a subcommand (the one-shot form)."""

    def parse_args(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["model", *args]
        return super().parse_args(ctx, args)


@click.group(cls=ExportGroup)
def export():
    """Convert to GGUF, quantize, or export a GGUF LoRA adapter.

    \b
    One shot (convert + quantize, files named <name>-<type>.gguf):
      edgetune export MODEL_DIR --quant q4_k_m,q8_0 [-o OUT_DIR]
      edgetune export runs/NAME        (a run folder: RUN/fused -> RUN/gguf with the run's export settings)
    Step by step:
      edgetune export gguf MODEL_DIR -o OUT.gguf --type f16
      edgetune export quantize IN.gguf --type q4_k_m --type q8_0 [--imatrix imatrix.gguf]
      edgetune export imatrix runs/NAME      (importance matrix from the run's train split)
    Pick the quant: edgetune export runs/NAME --quant auto [--max-kl 0.03 --min-top1 0.9]
      edgetune export adapter --base BASE_DIR --adapter ADAPTER_DIR -o adapter.gguf

    Every step verifies its output against llama.cpp unless --no-verify is given.
    """


def _verify_option(f):
    return click.option("--verify/--no-verify", default=None, help="Check the GGUF against the source model (default: on).")(f)


def _imatrix_value(ctx, param, value):
    """--imatrix FILE | auto | off."""
    if value is None or value in ("auto", "off") or Path(value).is_file():
        return value
    raise click.BadParameter(f"{value!r} is neither a file nor 'auto' / 'off'.", ctx=ctx, param=param)


def _print_auto(res) -> None:
    from ..console import console

    if not res:
        return
    console.print(f"[bold]--quant auto:[/] {res['reason']}", highlight=False, soft_wrap=True)
    console.print(f"table: {res['report']} (+ .json, .png)", highlight=False)


@export.command("model", hidden=True)
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--quant", "-q", "quants", multiple=True,
              help=QUANT_HELP + " 'auto': measure a ladder of types and keep the smallest that passes --max-kl/--min-top1."
              " Default from the config (q4_k_m), or the run's.")
@click.option("--type", "outtype", type=click.Choice(CHOICES["export.outtype"]), default=None, help="Unquantized GGUF type (default f16).")
@click.option("--imatrix", default=None, callback=_imatrix_value,
              help="Importance matrix FILE, 'auto' (default: computed from --calib / the run's train split when a type benefits) or 'off'.")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration data for the imatrix: JSONL rows (rendered through the chat template) or text. Default: RUN/data/train.jsonl.")
@click.option("--heldout", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Held-out JSONL/text that --quant auto measures on. Default: RUN/data/valid.jsonl, else a fixed corpus.")
@click.option("--max-kl", type=float, default=None, help="--quant auto gate: highest mean KL vs f16 (default 0.03).")
@click.option("--min-top1", type=float, default=None, help="--quant auto gate: lowest top-1 agreement with f16 (default 0.90).")
@click.option("--ladder", "ladder", multiple=True, help="Types --quant auto tries, comma-separated (default: the ladder of export/qtypes.py).")
@click.option("--name", default=None, help="File name stem (default: the model folder's, or the run's for RUN/fused).")
@click.option("--output", "-o", "out_dir", type=click.Path(file_okay=False), default=None, help="Output folder (default: gguf/ beside MODEL_DIR).")
@click.option("--config", "recipe", type=click.Path(dir_okay=False), default=None, help="Recipe YAML: read its export section.")
@_verify_option
def export_one_shot(model_dir, quants, outtype, imatrix, calib, heldout, max_kl, min_top1, ladder, name, out_dir, recipe, verify):
    """Convert MODEL_DIR (an HF folder, or a run folder) to GGUF and quantize it (the one-shot form)."""
    from ..config import ExportConfig, load_config, override
    from ..console import console, out
    from ..quant.build import export_model, export_run_kwargs
    from ..runfolder import RunFolder

    run = RunFolder.open(model_dir) if RunFolder.is_run_folder(model_dir) else None
    cfg = load_config(recipe).export if recipe else (run.cfg.export if run else ExportConfig())
    if run:  # the run's fused model, settings and file names; flags still win
        model_dir = run.require(run.fused_dir, "fuse")
        out_dir = out_dir or run.gguf_dir
        name = name or run.model_name
    cfg = override(cfg, outtype=outtype, quants=_split(quants) or None, imatrix=imatrix, calib=calib, max_kl=max_kl,
                   min_top1=min_top1, ladder=_split(ladder) or None, verify=verify)
    res = export_model(model_dir, out_dir, cfg.quants, name=name, **export_run_kwargs(cfg, run, heldout=heldout))
    _print_verify(res["verify"])
    _print_drift(res["drift"], f"quantized vs {cfg.outtype} (llama.cpp)")
    _print_auto(res["auto"])
    if res["imatrix"] and res["imatrix"].get("tokens"):
        console.print(f"imatrix: {res['imatrix']['imatrix']} ({res['imatrix']['tokens']} tokens of {res['imatrix']['data']})", highlight=False)
    for q, p in res["files"].items():
        out.print(f"{q}\t{p}\t{Path(p).stat().st_size / 2**20:.1f} MiB", highlight=False)
    console.print(f"[green]wrote {len(res['files'])} GGUF file(s)[/]")


@export.command("imatrix")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--calib", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL rows in any training format (rendered through the chat template, prompts and answers) or a text file. Default for a run folder: RUN/data/train.jsonl.")
@output_option(required=False, help_="Output .gguf (default: gguf/imatrix.gguf beside MODEL_DIR; RUN/gguf/imatrix.gguf for a run).")
@click.option("--max-tokens", type=int, default=None, help="Calibration tokens at most (default 100000).")
@click.option("--chunk-size", type=int, default=None, help="Tokens per text at most (default 512, llama-imatrix's context).")
def imatrix_cmd(model_dir, calib, output, max_tokens, chunk_size):
    """Compute llama.cpp's importance matrix of MODEL_DIR (HF folder or run folder) from calibration data.

    Written in llama-imatrix's GGUF format; use it with `export --imatrix FILE` or `export quantize --imatrix FILE`.
    """
    from ..console import console, out
    from ..errors import EdgetuneError
    from ..export.imatrix import CHUNK_SIZE, MAX_TOKENS, make_imatrix
    from ..runfolder import RunFolder

    run = RunFolder.open(model_dir) if RunFolder.is_run_folder(model_dir) else None
    if run:
        model_dir = run.require(run.fused_dir, "fuse")
        calib = calib or run.cfg.export.calib or run.require(run.split("train"), "data")
        output = output or run.gguf_dir / "imatrix.gguf"
    if not calib:
        raise EdgetuneError("No calibration data.", fix="pass --calib FILE (e.g. RUN/data/train.jsonl), or a run folder")
    output = Path(output) if output else Path(model_dir).parent / "gguf" / "imatrix.gguf"
    rec = make_imatrix(model_dir, calib, output, max_tokens=max_tokens or MAX_TOKENS, chunk_size=chunk_size or CHUNK_SIZE)
    console.print(f"[green]wrote[/] {rec['imatrix']}: {rec['tensors']} tensors from {rec['tokens']} tokens "
                  f"({rec['texts']} texts of {rec['data']})", highlight=False)
    out.print(rec["imatrix"], highlight=False)


@export.command("gguf")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@output_option(required=False, help_="Output .gguf (default: gguf/<name>-<type>.gguf beside MODEL_DIR).")
@click.option("--type", "outtype", type=click.Choice(CHOICES["export.outtype"]), default="f16", show_default=True)
@_verify_option
def gguf_cmd(model_dir, output, outtype, verify):
    """Convert an HF model folder to a GGUF file."""
    from ..console import console, out
    from ..export.gguf import convert
    from ..quant.build import output_name

    dst = Path(output) if output else Path(model_dir).parent / "gguf" / f"{output_name(Path(model_dir))}-{outtype}.gguf"
    p = convert(model_dir, dst, outtype, verify=verify is not False)
    _print_verify(convert.last_report)
    out.print(str(p), highlight=False)
    console.print(f"[green]wrote[/] {p} ({p.stat().st_size / 2**20:.1f} MiB)", highlight=False)


@export.command("quantize")
@click.argument("in_gguf", type=click.Path(exists=True, dir_okay=False))
@click.option("--type", "-t", "qtypes", multiple=True, required=True, help=QUANT_HELP)
@output_option(required=False, help_="Output .gguf (one type) or folder (several). Default: beside IN_GGUF.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False), default=None, help="Importance matrix (llama-imatrix output).")
@_verify_option
def quantize_cmd(in_gguf, qtypes, output, imatrix, verify):
    """Quantize a GGUF with llama.cpp; report top-1 agreement and mean KL against IN_GGUF."""
    from ..console import console, out
    from ..errors import EdgetuneError
    from ..quant.build import quant_drift
    from ..quant.quantize import normalize_qtype, quantize

    types = [normalize_qtype(q) for q in _split(qtypes)]
    src = Path(in_gguf)
    stem = src.stem
    for suffix in ("-f16", "-bf16", "-f32"):
        stem = stem.removesuffix(suffix)
    files = {}
    for q in types:
        if output and len(types) == 1 and str(output).endswith(".gguf"):
            dst = Path(output)
        elif output:
            dst = Path(output) / f"{stem}-{q}.gguf"
        else:
            dst = src.parent / f"{stem}-{q}.gguf"
        if dst.resolve() == src.resolve():
            raise EdgetuneError("The output would overwrite the input.", where=str(dst), fix="choose another -o")
        files[q] = quantize(src, dst, q, imatrix=imatrix)
        out.print(f"{q}\t{files[q]}\t{files[q].stat().st_size / 2**20:.1f} MiB", highlight=False)
    if verify is not False:
        _print_drift(quant_drift(src, files), f"quantized vs {src.name} (llama.cpp)")
    console.print(f"[green]wrote {len(files)} file(s)[/]")


@export.command("adapter")
@click.option("--base", "base_dir", type=click.Path(exists=True, file_okay=False), required=True, help="Base model folder (HF).")
@click.option("--adapter", "adapter_dir", type=click.Path(exists=True, file_okay=False), required=True, help="LoRA adapter folder (PEFT or mlx-lm).")
@output_option(required=True, help_="Output adapter .gguf")
@click.option("--base-gguf", type=click.Path(exists=True, dir_okay=False), default=None, help="Existing f16 GGUF of the base, reused by the verification.")
@_verify_option
def adapter_cmd(base_dir, adapter_dir, output, base_gguf, verify):
    """Write a LoRA adapter as a GGUF adapter (llama.cpp --lora, llama-cpp-python lora_path, Ollama ADAPTER)."""
    from ..console import console, out
    from ..export.adapter import export_adapter

    p = export_adapter(base_dir, adapter_dir, output)
    if verify is not False:
        from ..eval.divergence import drift_table

        rep = verify_adapter_export(base_dir, adapter_dir, p, base_gguf=base_gguf)
        console.print(drift_table([rep.row], title="base GGUF + adapter GGUF vs fused GGUF"))
        console.print(rep.summary(), highlight=False, soft_wrap=True)
    out.print(str(p), highlight=False)
    console.print(f"[green]wrote[/] {p} ({p.stat().st_size / 2**20:.2f} MiB)", highlight=False)


def verify_adapter_export(base_dir, adapter_dir, adapter_gguf, *, base_gguf=None):
    """Fuse + convert in a temp folder, then compare base GGUF + adapter GGUF with the fused GGUF."""
    import tempfile

    from ..export.gguf import convert
    from ..export.verify import verify_adapter
    from ..fuse import fuse

    with tempfile.TemporaryDirectory(prefix="edgetune-verify-") as td:
        td = Path(td)
        if base_gguf is None:
            base_gguf = convert(base_dir, td / "base-f16.gguf", "f16", verify=False, show_progress=False)
        fused = fuse(base_dir, adapter_dir, td / "fused", show_progress=False)
        fused_gguf = convert(fused, td / "fused-f16.gguf", "f16", verify=False, show_progress=False)
        return verify_adapter(base_gguf, adapter_gguf, fused_gguf)
