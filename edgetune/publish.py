"""``edgetune publish RUN``: one folder, ready to share, from a finished run.

The folder (``RUN/publish/`` by default) holds::

    <name>-<type>.gguf   the run's GGUFs, hard-linked (else copied), never re-quantized
    Modelfile            the run's Modelfile, FROM (and ADAPTER) pointing at the files beside it
    LICENSE              the base model's license file, when it has one
    README.md            a model card: Hugging Face metadata (YAML front matter) + what it is, data,
                         eval table, template check, files, how to run it, limits, gates
    SHA256SUMS           sha256 of every other file (``sha256sum -c SHA256SUMS``)

It is built in a hidden sibling folder and renamed into place (:func:`edgetune.io.atomic_dir`), so a
failure leaves the previous folder as it was and nothing half-written under the final name.
``--hf DIR`` lays out the same files as a Hub repository (plus ``.gitattributes`` sending ``*.gguf``
to LFS), ``--upload`` sends it with ``huggingface_hub``, ``--ollama`` runs ``ollama create`` and
``ollama push``. What was published where is recorded in the run's registry entry
(``published.yaml``), or in the run's ``manifest.json`` when the run is not registered.

A run without an eval report, or whose eval gates failed, is refused unless ``force``; the card
then says so at its top.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import EdgetuneError
from .runfolder import RunFolder

PUBLISH_DIR = "publish"
CARD = "README.md"
SUMS = "SHA256SUMS"
GITATTRIBUTES = ".gitattributes"
LFS_LINE = "*.gguf filter=lfs diff=lfs merge=lfs -text\n"
# Hub repository ids: namespace/name, letters, digits, '-', '_', '.' (up to 96 characters each)
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class GGUFRow:
    """One GGUF of the published folder."""

    name: str
    path: Path
    qtype: str
    size: int
    sha256: str
    own: bool = True  # the run's own file (False: the source GGUF an adapter-route Modelfile runs on)


@dataclass(frozen=True)
class LicenseInfo:
    """The base model's license: its Hub id (``apache-2.0``, ``mit``, ``other``; None = unknown)."""

    id: str | None
    file: Path | None = None
    name: str | None = None  # license_name, for a license the Hub has no id for
    source: str = ""  # where it was found


@dataclass
class Publication:
    """Everything the card and the folder are made of, collected (and checked) from the run."""

    run: RunFolder
    ggufs: list[GGUFRow]
    modelfile: str  # rewritten to the files in the folder
    report: dict | None
    gates_failed: list[str]  # descriptions of failed gates (empty: passed, none configured or not evaluated)
    license: LicenseInfo
    base_id: str
    template_check: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class PublishResult:
    folder: Path
    files: dict[str, str]  # file name -> sha256 (what SHA256SUMS says)
    warnings: list[str]
    hf_dir: Path | None = None
    ollama: dict | None = None  # {"name", "commands", "ran"}
    uploaded: str | None = None  # the Hub URL
    recorded_in: str = ""  # the registry entry (NAME:vN) or the run's manifest.json


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------
# names and targets, checked before anything is done


def check_push_name(name: str) -> str:
    """An Ollama name ``ollama push`` can take: ``namespace/name[:tag]``."""
    from .ollama_client import check_model_name

    check_model_name(name)
    if "/" not in name.split(":", 1)[0]:
        raise EdgetuneError(f"{name!r} has no namespace: `ollama push` needs namespace/name[:tag].",
                            fix="use your ollama.com user name as the namespace, e.g. alice/support-triage:q4")
    return name


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID_RE.match(repo_id or "") or ".." in repo_id:
        raise EdgetuneError(f"{repo_id!r} is not a Hugging Face repository id.",
                            fix="write namespace/name, e.g. alice/support-triage-gguf")
    return repo_id


def _listed(sums: Path) -> set[str]:
    return {line.split("  ", 1)[1] for line in sums.read_text(encoding="utf-8").splitlines() if "  " in line}


def check_target(path: Path) -> Path:
    """``path`` may be replaced: it does not exist, is empty, or holds only what a publish wrote there
    (every file is listed in its SHA256SUMS), so a mistyped --out never replaces someone's folder."""
    if not path.exists():
        return path
    if not path.is_dir():
        raise EdgetuneError(f"{path} exists and is not a folder.", where=str(path), fix="choose a new folder")
    names = {p.name for p in path.iterdir()}
    if names and not ((path / SUMS).is_file() and names <= _listed(path / SUMS) | {SUMS}):
        raise EdgetuneError(f"{path} exists and was not written by edgetune publish; publishing would replace it.",
                            where=str(path), fix="choose a new or empty folder (or remove this one)")
    return path


# --------------------------------------------------------------------------------------------
# what the run holds


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _quant_type(path: Path, fallback: str) -> str:
    """The GGUF's weight type from its own metadata (general.file_type), else ``fallback``."""
    from .export.gguf_info import read_metadata
    from .qtypes import QTYPES

    try:
        meta = read_metadata(path, ["general.type", "general.file_type"])
    except EdgetuneError:
        return fallback
    if meta.get("general.type") == "adapter":
        return "LoRA adapter"
    if isinstance(meta.get("general.file_type"), int):
        from gguf import LlamaFileType

        try:
            ftype = LlamaFileType(meta["general.file_type"]).name
        except ValueError:
            return fallback
        return next((q.name for q in QTYPES.values() if q.ftype == ftype), ftype.lower())
    return fallback


def _gguf_row(path: Path, fallback: str, own: bool = True) -> GGUFRow:
    from .io import sha256_file

    return GGUFRow(path.name, path, _quant_type(path, fallback), path.stat().st_size, sha256_file(path), own)


def _modelfile_targets(run: RunFolder, text: str, rows: list[GGUFRow]) -> tuple[str, list[GGUFRow]]:
    """The Modelfile with FROM / ADAPTER pointing at ``./<file>`` in the folder, and the rows with any
    file it runs on that is not the run's own (the source GGUF of the adapter route) added."""
    from .ollama.modelfile_syntax import parse_modelfile
    from .registry import rebase_modelfile

    mf = parse_modelfile(text, str(run.modelfile))
    by_path = {r.path.resolve(): r for r in rows}
    rows = list(rows)
    for key, adapter in (("model", False), ("adapter", True)):
        value = mf.get(key)
        if not value:
            continue
        p = Path(value).expanduser()
        p = p if p.is_absolute() else run.modelfile.parent / p
        if not p.is_file():
            if adapter or value.startswith((".", "/", "~")) or value.endswith(".gguf"):
                raise EdgetuneError(f"The Modelfile's {'ADAPTER' if adapter else 'FROM'} {value} is not a file.",
                                    where=str(run.modelfile), fix=f"re-write it with `edgetune ollama {run.root}`")
            continue  # FROM an Ollama model name (the adapter route on an Ollama base): the user pulls it
        row = by_path.get(p.resolve())
        if row is None:
            row = _gguf_row(p, "source", own=False)
            rows.append(row)
        text = rebase_modelfile(text, row.name, adapter=adapter)
    return text, rows


def _report_gates(run: RunFolder, report: dict | None) -> list[str]:
    """Descriptions of the failed eval gates, from the report and the manifest's eval summary."""
    from .eval.gates import describe

    failed = []
    gates = (report or {}).get("gates") or {}
    if gates.get("passed") is False:
        failed = [describe(f) for f in gates.get("failures") or []] or ["see " + str(run.eval_report("md"))]
    summary = run.manifest().get("stages", {}).get("eval", {}).get("summary", {})
    if not failed and summary.get("gates_passed") is False:
        failed = ["the eval stage recorded failed gates (see " + str(run.eval_report("md")) + ")"]
    return failed


def _template_check(run: RunFolder) -> str:
    """The TEMPLATE-vs-chat-template check: as the ollama stage recorded it, else run now (a tokenizer
    and some renderings: seconds), else why not."""
    recorded = run.manifest().get("stages", {}).get("ollama", {}).get("summary", {}).get("check")
    if recorded:
        return str(recorded)
    model_dir = run.fused_dir if run.fused_dir.is_dir() else run.base_model_dir
    try:
        from .ollama.check import check_modelfile

        res = check_modelfile(run.modelfile, model_dir)
    except (EdgetuneError, ImportError, OSError) as exc:
        return f"not run ({getattr(exc, 'message', exc)})"
    checked = sum(c.status != "skipped" for c in res.conversations)
    return (f"pass ({res.n_identical} of {checked} conversations token-identical)" if res.ok
            else f"DIFFERENT: the TEMPLATE does not render the chat template (edgetune ollama check {run.root})")


def _license_id_from_text(text: str) -> str:
    head = " ".join(text[:600].split()).lower()
    if "apache license" in head and "version 2.0" in head:
        return "apache-2.0"
    if "mit license" in head or "permission is hereby granted, free of charge" in head:
        return "mit"
    return "other"


def find_license(base_dir: Path, ggufs: list[GGUFRow] = ()) -> LicenseInfo:
    """The base model's license: its LICENSE file; else the license its README's metadata, its
    config.json or its SOURCE.md (the demo model's record) names; else a GGUF's general.license."""
    from .export.model_info import license_file, readme_metadata
    from .io import read_json

    base = Path(base_dir)
    meta = readme_metadata(base) if base.is_dir() else {}
    named = meta.get("license") if isinstance(meta.get("license"), str) else None
    lic_name = meta.get("license_name") if isinstance(meta.get("license_name"), str) else None
    f = license_file(base) if base.is_dir() else None
    if f is not None:
        lid = named or _license_id_from_text(f.read_text(encoding="utf-8", errors="replace"))
        return LicenseInfo(lid.lower(), f, lic_name, f"the base model's {f.name}")
    if named:
        return LicenseInfo(named.lower(), None, lic_name, "the base model's README.md metadata")
    cfg = base / "config.json"
    if cfg.is_file() and isinstance(read_json(cfg).get("license"), str):
        return LicenseInfo(read_json(cfg)["license"].lower(), None, None, "the base model's config.json")
    source = base / "SOURCE.md"
    if source.is_file():
        m = re.search(r"^- license:\s*([A-Za-z0-9.+-]+)\s*$", source.read_text(encoding="utf-8", errors="replace"), re.M)
        if m:
            return LicenseInfo(m.group(1).lower(), None, None, "the base model's SOURCE.md")
    from .export.gguf_info import read_metadata

    for row in ggufs:
        try:
            v = read_metadata(row.path, ["general.license"]).get("general.license")
        except EdgetuneError:
            continue
        if isinstance(v, str) and v.strip() and len(v) <= 64 and "\n" not in v:
            return LicenseInfo(v.strip().lower(), None, None, f"general.license of {row.name}")
    return LicenseInfo(None, None, None, "not found")


def base_model_id(base_dir: Path) -> str:
    """The base model's Hub id where the folder tells it (a Hub cache path ``models--ORG--NAME``, the
    demo model's SOURCE.md, config.json's ``_name_or_path``), else the folder's name."""
    from .io import read_json

    d = Path(base_dir)
    for part in d.resolve().parts:
        m = re.fullmatch(r"models--([^/]+?)--([^/]+)", part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    source = d / "SOURCE.md"
    if source.is_file():
        m = re.search(r"^- upstream model:\s*(\S+/\S+)\s*$", source.read_text(encoding="utf-8", errors="replace"), re.M)
        if m:
            return m.group(1).strip("`")
    cfg = d / "config.json"
    name = read_json(cfg).get("_name_or_path") if cfg.is_file() else None
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not Path(name).exists():
        return name
    return d.name


def collect(run: RunFolder, *, force: bool = False) -> Publication:
    """What a publication of ``run`` is made of; refusals (no GGUF, no Modelfile; without ``force``: no
    eval report, failed gates) are :class:`EdgetuneError`\\ s naming the run and the fix."""
    from .io import read_json

    types = {run.gguf(t).name: t for t in run.export_types} | {run.adapter_gguf.name: "LoRA adapter"}
    files = [p for p in run.ggufs if p.is_file()]
    if not files:
        raise EdgetuneError(f"{run.root} has no exported GGUF to publish.", where=str(run.gguf_dir),
                            fix=f"run `edgetune run {run.root} --to export` (or `edgetune export {run.root}`) first")
    if not run.modelfile.is_file():
        raise EdgetuneError(f"{run.root} has no Modelfile to publish.", where=str(run.modelfile),
                            fix=f"write it with `edgetune ollama {run.root}` (or `edgetune run {run.root} --to ollama`)")
    warnings: list[str] = []
    report_path = run.eval_report("json")
    report = read_json(report_path) if report_path.is_file() else None
    if report is None:
        if not force:
            raise EdgetuneError(f"{run.root} has no eval report: the model was not evaluated.", where=str(report_path),
                                fix=f"run `edgetune eval {run.root}` (or `edgetune run {run.root}`); --force publishes it "
                                    "anyway, with a card that says it was not evaluated")
        warnings.append("the model was not evaluated (no eval report); the card says so")
    failed = _report_gates(run, report)
    if failed:
        if not force:
            raise EdgetuneError(f"{run.root} failed its eval gates: " + "; ".join(failed), where=str(run.eval_report("md")),
                                fix="improve the model or relax eval.gates / eval.max / eval.max_regression and re-run the eval; "
                                    "--force publishes it anyway, with a card that names the failed gates")
        warnings.append("the model failed its eval gates; the card says which")
    rows = [_gguf_row(p, types.get(p.name, "unknown")) for p in files]  # hashed once refusals are past
    modelfile, rows = _modelfile_targets(run, run.modelfile.read_text(encoding="utf-8"), rows)
    base = run.base_model_dir
    lic = find_license(base, rows)
    if lic.id is None:
        warnings.append(f"license: unknown (no LICENSE file or license metadata in {base}); the card says "
                        "'license: unknown': add the base model's license before sharing")
    return Publication(run, rows, modelfile, report, failed, lic, base_model_id(base), _template_check(run), warnings)


# --------------------------------------------------------------------------------------------
# the model card


def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.6g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(map(cell, r)) + " |" for r in rows)]


def card_metadata(pub: Publication) -> dict:
    """The card's YAML front matter (Hugging Face model-card metadata keys)."""
    cfg = pub.run.cfg
    tags = ["gguf", "edgetune", "ollama", cfg.train.method, cfg.train.objective]
    if pub.run.aligned:
        tags.append(cfg.align.objective)
    meta: dict[str, Any] = {
        "base_model": pub.base_id,
        "license": pub.license.id or "unknown",
    }
    if pub.license.id == "other" or (pub.license.id and pub.license.name):
        meta["license_name"] = pub.license.name or "see-license-file"
        if pub.license.file:
            meta["license_link"] = pub.license.file.name
    meta.update({"tags": list(dict.fromkeys(t for t in tags if t)), "library_name": "gguf", "pipeline_tag": "text-generation"})
    return meta


def _spec_text(spec: str) -> str:
    """``label=runner:/some/path/file`` -> ``runner `file` `` (no local paths in a card that is shared)."""
    runner, _, target = spec.split("=", 1)[-1].partition(":")
    return f"{runner} `{Path(target.split('+')[0]).name}`" if target else f"`{spec}`"


def _method_line(run: RunFolder) -> str:
    cfg = run.cfg
    t = cfg.train
    s = f"{t.method} (rank {t.rank}, alpha {t.alpha:g}), objective {t.objective}, {t.backend} backend"
    if run.aligned:
        a = cfg.align
        s += f"; then {a.objective} alignment ({a.method}, rank {a.rank})"
    return s


def _recipe_description(name: str) -> str | None:
    """The opening comment of the shipped recipe of that name (what it teaches), if there is one."""
    from .recipes import recipes_dir

    p = recipes_dir() / f"{name}.yaml"
    if not p.is_file():
        return None
    lines = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith("edgetune "):
            lines.append(text)
    return " ".join(lines) or None


def model_card(pub: Publication, ollama_name: str | None = None) -> str:
    """README.md: YAML front matter, then what it is, data, eval, template check, files, how to run,
    intended use and limits, gates, license."""
    from .ollama.modelfile_syntax import parse_modelfile

    run, cfg, report = pub.run, pub.run.cfg, pub.report
    name = run.model_name
    mf = parse_modelfile(pub.modelfile)
    body: list[str] = [f"# {name}", ""]
    if report is None:
        body += ["> **Warning: this model was NOT evaluated.** It was published with `--force` and has no eval "
                 "report: nothing below measures how well it does its task.", ""]
    if pub.gates_failed:
        body += ["> **Warning: this model FAILED its eval gates** and was published with `--force`:", ">"]
        body += [f"> - {g}" for g in pub.gates_failed] + [""]
    if pub.license.id is None:
        body += ["> **license: unknown.** No license was found with the base model; check the base model's "
                 "license before using or sharing this model.", ""]

    # what it is
    own = [r for r in pub.ggufs if r.own]
    body += ["## What it is", "",
             f"A fine-tune of `{pub.base_id}` made with edgetune, shipped as GGUF for llama.cpp and Ollama.", ""]
    body += _table(["", ""], [
        ["base model", f"`{pub.base_id}`" + (f" (local folder `{run.base_model_dir.name}`)" if run.base_model_dir.name != pub.base_id else "")],
        ["method", _method_line(run)],
        ["training", f"{cfg.train.iters} step{'s' * (cfg.train.iters != 1)}" if cfg.train.iters else f"{cfg.train.epochs:g} epochs"],
        ["recipe", f"`{cfg.name}`"],
        ["export route", "adapter (LoRA GGUF on the unmodified source GGUF)" if run.adapter_route
         else "merge (adapter merged into the base, then converted and quantized)"],
    ])

    # data
    body += ["", "## Data", ""]
    card_path = run.data_card
    if card_path.is_file():
        from .io import read_json, sha256_file

        dc = read_json(card_path)
        splits = dc.get("splits") or {}
        body += _table(["split", "rows"], [[s, _num(splits.get(s))] for s in ("train", "valid", "test") if s in splits])
        counts = dc.get("counts") or {}
        reasons = ", ".join(f"{k}: {v}" for k, v in (counts.get("rejected_by_reason") or {}).items())
        body += [""]
        body += [f"- source `{Path(s['path']).name}`: sha256 `{s.get('sha256')}`, {s.get('rows')} rows"
                 for s in dc.get("sources") or [] if isinstance(s, dict) and s.get("path")]
        body += [f"- data card sha256: `{sha256_file(card_path)}`",
                 f"- rejected rows: {_num(counts.get('rejected', 0))}" + (f" ({reasons})" if reasons else "")]
        th = dc.get("thinking") or {}
        if th:  # a thinking template: how the rows were rendered
            body += [f"- reasoning: {th.get('records_with_reasoning', 0)} rows with, {th.get('records_without_reasoning', 0)} "
                     f"without; trained with thinking on {th.get('thinking_on', 0)}, off {th.get('thinking_off', 0)} "
                     "(metrics prefixed `think_off.` below are the same test rows asked with thinking off)"]
    else:
        body += ["No data card (the run's data stage did not run)."]

    # eval
    body += ["", "## Evaluation", ""]
    if report is None:
        body += ["**Not evaluated.**"]
    else:
        from .eval.report import metric_order

        models = report.get("models") or []
        n_task = (report.get("n_examples") or {}).get("task")
        body += [f"On {n_task} held-out rows (`{Path(str(report.get('data', ''))).name}`), baseline "
                 f"`{report.get('baseline')}`, headline metric `{report.get('headline')}`. Every metric of the "
                 "eval report, every model:", ""]
        body += _table(["metric", *(m["name"] for m in models)],
                       [[k, *(_num((m.get("metrics") or {}).get(k)) for m in models)] for k in metric_order(report)])
        body += ["", "Models: " + "; ".join(f"`{m['name']}`: {_spec_text(m.get('spec', ''))}" for m in models) + "."]
    body += ["", "### Eval gates", ""]
    if report is None:
        body += ["Not evaluated: no gate was checked."]
    elif pub.gates_failed:
        body += ["**FAILED:**", ""] + [f"- {g}" for g in pub.gates_failed]
    else:
        checks = ((report.get("gates") or {}).get("checks")) or []
        if checks:
            from .eval.gates import describe

            body += [f"Passed ({len(checks)} checks):", ""] + [f"- {describe(c)}" for c in checks]
        else:
            body += ["No gates configured (eval.gates / eval.max / eval.max_regression)."]

    # template check
    body += ["", "## Ollama template check", "",
             f"The Modelfile's TEMPLATE rendered against the chat template the model was trained with: {pub.template_check}."]

    # files
    body += ["", "## Files", ""]
    body += _table(["file", "type", "bytes", "MB", "sha256"],
                   [[f"`{r.name}`", r.qtype, str(r.size), f"{r.size / 2**20:.1f}", f"`{r.sha256}`"] for r in pub.ggufs])
    extra = ["`Modelfile`", f"`{SUMS}`"] + ([f"`{pub.license.file.name}`"] if pub.license.file else [])
    body += ["", f"Also: {', '.join(extra)}. Check the files with `sha256sum -c {SUMS}`."]

    # how to run
    oname = ollama_name or name
    prompt = run.sample_prompt() or "Hello!"
    main = next((r for r in pub.ggufs if f"./{r.name}" == mf.get("model")), own[0])
    body += ["", "## How to run it", "", "```sh",
             f"ollama create {oname} -f Modelfile",
             f"ollama run {oname} {shlex.quote(prompt)}"]
    if run.adapter_route:
        adapter = next(r for r in pub.ggufs if f"./{r.name}" == mf.get("adapter"))
        source = f"./{main.name}" if main is not adapter and (mf.get("model") or "").startswith("./") else "BASE.gguf"
        body += [f"llama-cli -m {source} --lora ./{adapter.name} -cnv"]
        if source == "BASE.gguf":
            body += [f"# BASE.gguf: the GGUF of the Ollama model {mf.get('model')} (the Modelfile's FROM)"]
    else:
        body += [f"llama-cli -m ./{main.name} -cnv", f"llama-server -m ./{main.name} --port 8080"]
    body += ["```", "", "`llama-cli -cnv` uses the chat template stored in the GGUF; the Modelfile's TEMPLATE renders the "
             "same prompts (see the template check)."]

    # intended use and limits
    body += ["", "## Intended use and limits", ""]
    desc = _recipe_description(cfg.name)
    if desc:
        body += [f"Recipe: {desc}", ""]
    system = mf.get("system")
    if system:
        body += [f"Trained with the system prompt (the Modelfile's SYSTEM): \"{' '.join(system.split())}\"", ""]
    splits = {}
    if card_path.is_file():
        from .io import read_json

        splits = read_json(card_path).get("splits") or {}
    n_train = splits.get("train")
    n_eval = (report or {}).get("n_examples", {}).get("task") if report else None
    body += [f"- A small fine-tune: a {cfg.train.method} adapter trained on {n_train if n_train is not None else 'an unknown number of'} "
             f"rows of one task, on top of `{pub.base_id}`; it inherits that model's knowledge, biases and limits.",
             (f"- Evaluated on {n_eval} held-out rows of the same data; behaviour on other tasks or data was not measured."
              if n_eval is not None else "- Not evaluated."),
             "- Quantized files differ slightly from the tuned model; the eval table shows by how much on the held-out rows.",
             "- Not for decisions about people, or any use where a wrong answer causes harm, without review."]

    # license
    body += ["", "## License", ""]
    lic = pub.license
    if lic.id is None:
        body += ["license: unknown (no license file or license metadata was found with the base model)."]
    else:
        body += [f"`{lic.id}`, the base model's license (from {lic.source})"
                 + (f"; the text is in `{lic.file.name}`." if lic.file else ".")]
    body += ["", f"Made with edgetune {_edgetune_version()} from the run `{cfg.name}`."]
    front = yaml.safe_dump(card_metadata(pub), sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(body) + "\n"


def _edgetune_version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# the folder


def build_folder(dest: Path, pub: Publication, card: str, *, hub: bool = False) -> dict[str, str]:
    """Write the folder atomically (a sibling temp folder renamed onto ``dest``); returns file -> sha256."""
    from .io import atomic_dir
    from .ollama.modelfile_syntax import parse_modelfile
    from .registry import place_file

    with atomic_dir(dest) as tmp:
        sums: dict[str, str] = {}
        for r in pub.ggufs:
            place_file(r.path, tmp / r.name)
            sums[r.name] = r.sha256
        texts = {"Modelfile": pub.modelfile.encode(), CARD: card.encode()}
        if pub.license.file is not None:
            texts[pub.license.file.name] = pub.license.file.read_bytes()
        if hub:
            texts[GITATTRIBUTES] = LFS_LINE.encode()
        for name, data in texts.items():
            (tmp / name).write_bytes(data)
            sums[name] = _sha256_bytes(data)
        mf = parse_modelfile(pub.modelfile, str(tmp / "Modelfile"))
        for key in ("model", "adapter"):  # every file the Modelfile runs on is in the folder
            v = mf.get(key) or ""
            if v.startswith("./") and not (tmp / v[2:]).is_file():
                raise EdgetuneError(f"The published Modelfile's {key.upper()} {v} is not in the folder.", where=str(dest))
        _write_sums(tmp / SUMS, sums)
    return sums


def _write_sums(path: Path, sums: dict[str, str]) -> None:
    """``sha256sum`` format: ``<hex>  <name>``, sorted by name."""
    path.write_text("".join(f"{h}  {n}\n" for n, h in sorted(sums.items())), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Ollama and the Hub


def _run_shown(cmd: list[str], shown: str, log: Callable[[str], None], where: str) -> None:
    """Run ``cmd``, passing each line of its output to ``log``; a failure names the command."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:
        raise EdgetuneError(f"`{shown}` could not start: {exc}", where=where) from None
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        log(line)
        tail = (tail + [line])[-15:]
    rc = proc.wait()
    if rc != 0:
        raise EdgetuneError(f"`{shown}` failed (exit {rc})" + (":\n" + "\n".join(tail) if tail else "."), where=where,
                            fix="read its output above; `ollama push` needs the namespace to be your ollama.com user "
                                "(or an organisation of yours) with this machine's key added to it")


def ollama_publish(modelfile: Path, name: str, log: Callable[[str], None]) -> dict:
    """``ollama create NAME -f Modelfile`` then ``ollama push NAME`` when ollama is on PATH; without it,
    the commands to run (``ran`` False)."""
    from .ollama_client import create_command

    create = create_command(name, modelfile)
    push = ["ollama", "push", name]
    shown = [shlex.join(create), shlex.join(push)]
    exe = shutil.which("ollama")
    if exe is None:
        return {"name": name, "commands": shown, "ran": False}
    for cmd, text in zip((create, push), shown, strict=True):
        log(f"$ {text}")
        _run_shown([exe, *cmd[1:]], text, log, str(modelfile))
    return {"name": name, "commands": shown, "ran": True}


def hub_token() -> str | None:
    """A Hugging Face token from HF_TOKEN, else the one ``hf auth login`` stored; read here, without
    the network (huggingface_hub's own lookup may refresh a token online)."""
    tok = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if tok and tok.strip():
        return tok.strip()
    path = os.environ.get("HF_TOKEN_PATH")
    if not path and os.environ.get("HF_HOME"):
        path = str(Path(os.environ["HF_HOME"]).expanduser() / "token")
    if not path:
        from huggingface_hub import constants

        path = constants.HF_TOKEN_PATH
    try:
        tok = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return tok or None


def upload_command(repo_id: str, folder: Path) -> str:
    return shlex.join(["hf", "upload", repo_id, str(folder), "."])


def hub_upload(folder: Path, repo_id: str, log: Callable[[str], None]) -> str:
    """Upload ``folder`` to the model repository ``repo_id`` (created if missing); returns its URL.
    Refused, with the command to run later, without huggingface_hub, a token or the network."""
    cmd = upload_command(repo_id, folder)
    later = (f"the folder is ready: upload it later with `{cmd}` "
             f"(huggingface_hub < 1.0: `huggingface-cli upload {repo_id} {folder} .`)")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise EdgetuneError("Uploading needs the Python package huggingface_hub, which is not installed; nothing was uploaded.",
                            where=str(folder), fix="pip install huggingface_hub; " + later) from None
    token = hub_token()
    if not token:
        raise EdgetuneError("No Hugging Face token (HF_TOKEN or a stored login): nothing was uploaded.",
                            where=str(folder), fix="log in with `hf auth login` (or set HF_TOKEN); " + later)
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or constants.HF_HUB_OFFLINE:
        raise EdgetuneError("Offline (HF_HUB_OFFLINE is set): nothing was uploaded.", where=str(folder),
                            fix="unset HF_HUB_OFFLINE on a machine with network; " + later)
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as exc:
        raise EdgetuneError(f"Offline: {url.hostname} is not reachable ({exc}); nothing was uploaded.", where=str(folder),
                            fix="connect to the network; " + later) from None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    log(f"uploading {folder} to {repo_id}")
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="edgetune publish")
    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


# --------------------------------------------------------------------------------------------
# the record of what went where


def record(run: RunFolder, pub: Publication, item: dict) -> str:
    """Append ``item`` to the run's registry entry (``published.yaml``) when the run, as it is, is
    registered; else to the run's manifest.json. Returns where it went."""
    from . import registry
    from .io import read_json, write_json

    entry = registry.entry_for_run(run, {r.name: r.sha256 for r in pub.ggufs if r.own})
    if entry is not None:
        registry.record_publication(entry, item)
        return entry.ref
    manifest = read_json(run.manifest_path) if run.manifest_path.is_file() else {"stages": {}}
    manifest.setdefault("published", []).append(item)
    write_json(run.manifest_path, manifest)
    return str(run.manifest_path)


def publish(run_dir: str | os.PathLike | RunFolder, out: str | os.PathLike | None = None, *, force: bool = False,
            ollama: str | None = None, hf: str | os.PathLike | None = None, upload: str | None = None,
            log: Callable[[str], None] | None = None) -> PublishResult:
    """Publish the finished run ``run_dir`` into ``out`` (default ``RUN/publish``); ``hf``: also lay out a
    Hub repository there (``upload``: and upload it to that repo id); ``ollama``: create and push
    ``namespace/name[:tag]`` (or return the commands when ollama is not on PATH). Names and folders are
    checked before anything is written; see the module docstring."""
    from .pipeline import _lock  # one writer per run folder: `edgetune run` or a publish

    log = log or (lambda s: None)
    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder.open(run_dir)
    if upload and hf is None:
        raise EdgetuneError("--upload needs --hf DIR (the Hub repository folder it uploads).",
                            fix="add --hf DIR, e.g. --hf runs/NAME/hf --upload alice/NAME-gguf")
    if ollama:
        check_push_name(ollama)
    if upload:
        check_repo_id(upload)
    folder = check_target(Path(out) if out else run.root / PUBLISH_DIR)
    hf_dir = check_target(Path(hf)) if hf is not None else None
    if hf_dir is not None and hf_dir.resolve() == folder.resolve():
        raise EdgetuneError(f"--hf {hf_dir} is the publish folder itself.", fix="give --hf another folder")
    with _lock(run):
        pub = collect(run, force=force)
        card = model_card(pub, ollama)
        sums = build_folder(folder, pub, card)
        result = PublishResult(folder, sums, pub.warnings)
        result.recorded_in = record(run, pub, {"kind": "folder", "target": str(folder.resolve()), "time": _now(), "files": sums})
        if hf_dir is not None:
            hub_sums = build_folder(hf_dir, pub, card, hub=True)
            result.hf_dir = hf_dir
            record(run, pub, {"kind": "hf", "target": str(hf_dir.resolve()), "time": _now(), "files": hub_sums})
        if ollama:
            result.ollama = ollama_publish(folder / "Modelfile", ollama, log)
            if result.ollama["ran"]:
                record(run, pub, {"kind": "ollama", "target": ollama, "time": _now(), "files": sums})
        if upload:
            assert hf_dir is not None
            result.uploaded = hub_upload(hf_dir, upload, log)
            record(run, pub, {"kind": "hf", "target": upload, "url": result.uploaded, "time": _now(), "files": hub_sums})
    return result


def publications(run: RunFolder) -> list[dict]:
    """What was recorded for ``run`` in its manifest (a registered run's records are in its entry)."""
    from .io import read_json

    return list(read_json(run.manifest_path).get("published") or []) if run.manifest_path.is_file() else []
