"""`edgetune run`: every stage of a recipe in order, skipping what is already done.

The run folder is the contract between stages (see DESIGN.md)::

    RUN/run.yaml          every effective setting, written before anything else
    RUN/data/             train/valid/test.jsonl, data_card.json, rejects.jsonl
    RUN/train/            checkpoints, metrics; RUN/train/adapter/ (PEFT format)
    RUN/fused/            base + adapter merged (HF folder)
    RUN/gguf/<name>-<type>.gguf
    RUN/ollama/Modelfile
    RUN/eval/             report.json / report.md / report.html
    RUN/manifest.json     what each stage did: status, input hash, output hash, time, summary

A stage is skipped when the manifest says it finished with the same *input hash* and its outputs
are still on disk. A stage's input hash covers its own config section and the *output hash* of
the stages it reads, so changing a training setting re-runs train and everything after it, while
re-running data prepare that produces identical files does not force a retrain. ``--from STAGE``
forces a stage and the ones after it. A stage that was interrupted (Ctrl-C, kill, crash) is run
again; training is asked to resume from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import RunConfig, dump_yaml, load_config, to_dict
from .console import console
from .errors import EdgetuneError
from .io import read_json, sha256_dir, sha256_file, write_json, write_text

STAGES = ("data", "train", "fuse", "export", "ollama", "eval", "register")
STAGE_HELP = {
    "data": "validate, clean, dedup and split the data (RUN/data/)",
    "train": "fine-tune an adapter on the train split (RUN/train/adapter/)",
    "fuse": "merge the adapter into the base model (RUN/fused/)",
    "export": "convert to GGUF and quantize (RUN/gguf/)",
    "ollama": "write and check the Ollama Modelfile (RUN/ollama/Modelfile)",
    "eval": "compare base vs tuned vs quantized on the test split (RUN/eval/)",
    "register": "add the model to the registry (<home>/<name>/vN/)",
}
DEMO = "demo"  # recipe value meaning "the demo base model" / "the shipped demo dataset"
DEMO_DATA = "support_tickets.jsonl"
MANIFEST = "manifest.json"
SMALL_FILE = 64 << 20  # model files up to this size are hashed by content, larger ones by size


# --------------------------------------------------------------------------------------------
# resolving recipe values


def demo_data_path() -> Path:
    return Path(str(resources.files("edgetune") / "resources" / "demo" / DEMO_DATA))


def recipes_dir() -> Path:
    return Path(str(resources.files("edgetune") / "resources" / "recipes"))


def find_recipe(recipe: str | Path) -> Path:
    """A recipe file, a run folder (its run.yaml), or a shipped recipe name (``quickstart``, ``mac-lora-7b`` …)."""
    p = Path(recipe)
    if p.is_file():
        return p
    if p.is_dir() and (p / "run.yaml").is_file():  # a run folder: continue it with its own settings
        return p / "run.yaml"
    shipped = recipes_dir() / f"{Path(str(recipe)).stem}.yaml"
    if not p.suffix and shipped.is_file():
        return shipped
    names = sorted(f.stem for f in recipes_dir().glob("*.yaml"))
    raise EdgetuneError(f"Recipe not found: {recipe}", fix=f"give a YAML file, or a shipped recipe: {', '.join(names)}")


def resolve_model(model: str) -> Path:
    from .paths import demo_model_dir

    if not model:
        raise EdgetuneError("The recipe names no base model.", fix="set `model: path/to/hf-folder` (or `model: demo`)")
    return demo_model_dir() if model == DEMO else Path(model).expanduser()


def resolve_data(path: str | None) -> Path:
    if not path:
        raise EdgetuneError("The recipe names no training data.", fix="set `data: {path: file.jsonl}` (or `path: demo`)")
    return demo_data_path() if path == DEMO else Path(path).expanduser()


def require_model(model_dir: Path, model: str) -> Path:
    if not (model_dir / "config.json").is_file():
        fix = "run `edgetune models fetch-demo`" if model == DEMO else "point `model:` at a local HF model folder (config.json, safetensors, tokenizer)"
        raise EdgetuneError(f"Base model folder not found or incomplete: {model_dir}", where=str(model_dir), fix=fix)
    return model_dir


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The effective config of an existing run folder (what later commands read)."""
    p = Path(run_dir) / "run.yaml"
    if not p.is_file():
        raise EdgetuneError(f"{run_dir} is not a run folder (no run.yaml).", fix="run `edgetune run RECIPE.yaml` first")
    return load_config(p)


# --------------------------------------------------------------------------------------------
# hashing


def _h(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a base model folder without reading gigabytes: config/tokenizer files by content,
    weight files by name and size (re-hashing a 16 GB base on every run would dominate a short run)."""
    parts = []
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        digest = sha256_file(f) if size <= SMALL_FILE else f"size:{size}"
        parts.append((str(f.relative_to(model_dir)), digest))
    return _h(parts)


def hash_path(p: Path) -> str:
    return sha256_dir(p) if p.is_dir() else sha256_file(p)


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Ctx:
    cfg: RunConfig
    run_dir: Path
    model_dir: Path
    data_path: Path
    manifest: dict
    log: Callable[[str], None] = console.print

    def output_hash(self, stage: str) -> str | None:
        return self.manifest["stages"].get(stage, {}).get("output_hash")

    @property
    def model_name(self) -> str:
        return self.cfg.ollama.name or self.cfg.name

    def gguf_path(self, outtype: str) -> Path:
        return self.run_dir / "gguf" / f"{self.model_name}-{outtype}.gguf"

    @property
    def modelfile_quant(self) -> str:
        return self.cfg.ollama.quant or (self.cfg.export.quants[0] if self.cfg.export.quants else self.cfg.export.outtype)


@dataclass
class Stage:
    name: str
    inputs: Callable[[Ctx], dict]  # what the input hash covers
    outputs: Callable[[Ctx], list[Path]]  # must all exist for the stage to count as done
    run: Callable[[Ctx, bool], dict]  # (ctx, resume) -> summary recorded in the manifest


def _api(module: str, attr: str, stage: str):
    """Import a stage's function lazily; a missing stage says so instead of failing obscurely."""
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise EdgetuneError(
            f"Stage '{stage}' is unavailable in this build: {module}.{attr} could not be loaded ({exc}).",
            fix=f"run the stages before it with `--to {STAGES[STAGES.index(stage) - 1]}`" if stage != STAGES[0] else None,
        ) from None


# --- data -------------------------------------------------------------------------------------


def _data_inputs(c: Ctx) -> dict:
    return {"cfg": to_dict(c.cfg.data) | {"path": None}, "source": hash_path(c.data_path), "model": c.manifest["model_fingerprint"]}


def _data_run(c: Ctx, resume: bool) -> dict:
    prepare = _api("edgetune.data", "prepare", "data")
    card = prepare(c.data_path, c.run_dir / "data", c.cfg.data, model_dir=c.model_dir)
    counts = {k: card.get(k) for k in ("splits", "counts") if isinstance(card, dict) and k in card}
    return {"card": str(c.run_dir / "data" / "data_card.json"), **counts}


# --- train ------------------------------------------------------------------------------------


def _train_inputs(c: Ctx) -> dict:
    return {"cfg": to_dict(c.cfg.train), "model": c.manifest["model_fingerprint"], "data": c.output_hash("data")}


def _train_run(c: Ctx, resume: bool) -> dict:
    train = _api("edgetune.train", "train", "train")
    out = c.run_dir / "train"
    if not resume and out.exists():
        # inputs changed (or --from train): the old checkpoints belong to another run
        import shutil

        shutil.rmtree(out)
    result = train(c.model_dir, c.run_dir / "data", out, c.cfg.train, resume=resume)
    summary: dict[str, Any] = {"adapter": str(out / "adapter"), "resumed": resume}
    if hasattr(result, "as_dict"):
        result = result.as_dict()
    if isinstance(result, dict):
        summary.update({k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "adapter_dir"})
    return summary


# --- fuse -------------------------------------------------------------------------------------


def _fuse_inputs(c: Ctx) -> dict:
    return {"model": c.manifest["model_fingerprint"], "adapter": c.output_hash("train")}


def _fuse_run(c: Ctx, resume: bool) -> dict:
    fuse = _api("edgetune.fuse", "fuse", "fuse")
    fuse(c.model_dir, c.run_dir / "train" / "adapter", c.run_dir / "fused")
    return {"fused": str(c.run_dir / "fused")}


# --- export -----------------------------------------------------------------------------------


def _export_outputs(c: Ctx) -> list[Path]:
    return [c.gguf_path(c.cfg.export.outtype)] + [c.gguf_path(q) for q in c.cfg.export.quants]


def _export_inputs(c: Ctx) -> dict:
    return {"cfg": to_dict(c.cfg.export), "name": c.model_name, "fused": c.output_hash("fuse")}


def _export_run(c: Ctx, resume: bool) -> dict:
    convert = _api("edgetune.export.gguf", "convert", "export")
    base = c.gguf_path(c.cfg.export.outtype)
    convert(c.run_dir / "fused", base, c.cfg.export.outtype, verify=c.cfg.export.verify)
    files = {c.cfg.export.outtype: str(base)}
    if c.cfg.export.quants:
        quantize = _api("edgetune.export.quantize", "quantize", "export")
        for q in c.cfg.export.quants:
            if q == c.cfg.export.outtype:
                continue
            quantize(base, c.gguf_path(q), q)
            files[q] = str(c.gguf_path(q))
    return {"gguf": files, "sizes_mb": {k: round(Path(v).stat().st_size / 2**20, 1) for k, v in files.items()}}


# --- ollama -----------------------------------------------------------------------------------


def _ollama_inputs(c: Ctx) -> dict:
    return {"cfg": to_dict(c.cfg.ollama), "name": c.model_name, "quant": c.modelfile_quant, "export": c.output_hash("export")}


def _ollama_run(c: Ctx, resume: bool) -> dict:
    write_modelfile = _api("edgetune.export.ollama", "write_modelfile", "ollama")
    check_modelfile = _api("edgetune.export.ollama", "check_modelfile", "ollama")
    gguf = c.gguf_path(c.modelfile_quant)
    if not gguf.is_file():
        raise EdgetuneError(
            f"ollama.quant = {c.modelfile_quant} but {gguf.name} was not exported.",
            fix=f"add {c.modelfile_quant} to export.quants or set ollama.quant to one of {c.cfg.export.quants}",
        )
    o = c.cfg.ollama
    kwargs: dict[str, Any] = {
        "model_dir": c.run_dir / "fused",
        "system": o.system,  # None: the training data's dominant system prompt
        "train_data": c.run_dir / "data" / "train.jsonl",
        "template_file": o.template,
        **{k: getattr(o, k) for k in ("temperature", "top_p", "top_k", "repeat_penalty", "num_ctx")},
    }
    modelfile = Path(write_modelfile(gguf, c.run_dir / "ollama", c.model_name, **kwargs))
    check = check_modelfile(modelfile, c.run_dir / "fused")
    if not _check_ok(check):
        raise EdgetuneError(
            "The Modelfile's template does not render the same tokens as the training chat template.",
            where=str(modelfile),
            fix=f"see `edgetune ollama check {modelfile} --model-dir {c.run_dir / 'fused'}`",
        )
    n_conv = len(getattr(check, "conversations", []) or [])
    summary = {"modelfile": str(modelfile), "gguf": str(gguf), "check": f"pass ({n_conv} conversations token-identical)"}
    if o.create:
        create = _api("edgetune.export.ollama", "ollama_create", "ollama")
        res = create(modelfile, c.model_name)
        summary["create"] = {"ran": res.ran, "command": res.command, "message": res.message, "answer": res.answer}
    return summary


def _check_ok(check: Any) -> bool:
    if isinstance(check, bool):
        return check
    if isinstance(check, dict):
        return bool(check.get("ok", check.get("passed", True)))
    for attr in ("ok", "passed"):
        if hasattr(check, attr):
            return bool(getattr(check, attr))
    return True  # a checker that raises on failure and returns a report otherwise


# --- eval -------------------------------------------------------------------------------------


def eval_specs(c: Ctx) -> dict[str, str]:
    """label -> model spec: the base model, the tuned (fused) model, the Modelfile's quantized GGUF."""
    specs = {"base": f"hf:{c.model_dir}", "tuned": f"hf:{c.run_dir / 'fused'}"}
    q = c.modelfile_quant
    if c.gguf_path(q).is_file():
        specs[q] = f"gguf:{c.gguf_path(q)}"
    return specs


def _eval_data(c: Ctx) -> Path:
    return Path(c.cfg.eval.data) if c.cfg.eval.data else c.run_dir / "data" / "test.jsonl"


def _eval_inputs(c: Ctx) -> dict:
    return {
        "cfg": to_dict(c.cfg.eval),
        "data": hash_path(_eval_data(c)) if _eval_data(c).exists() else None,
        "model": c.manifest["model_fingerprint"],
        "fused": c.output_hash("fuse"),
        "export": c.output_hash("export"),
    }


def _eval_run(c: Ctx, resume: bool) -> dict:
    evaluate = _api("edgetune.eval", "evaluate", "eval")
    specs = eval_specs(c)
    report = evaluate(_eval_data(c), [f"{k}={v}" for k, v in specs.items()], c.run_dir / "eval", c.cfg.eval, baseline="base")
    gates = report.get("gates") or {}
    summary = {
        "specs": specs,
        "headline": report.get("headline"),
        "n_examples": report.get("n_examples"),
        "metrics": extract_metrics(report),
        "gates_passed": gates.get("passed", True),
        "report": str(c.run_dir / "eval" / "report.md"),
    }
    if not summary["gates_passed"]:
        # the run stops here: a model that fails its gates is not registered
        c.manifest["stages"]["eval"]["summary"] = summary
        from .eval.gates import describe

        failed = "; ".join(describe(f) for f in gates.get("failures", [])) or "see the report"
        raise EdgetuneError(f"Eval gates failed: {failed}", where=summary["report"], fix="improve the model or relax eval.gates / eval.max_regression")
    return summary


def extract_metrics(report: dict) -> dict[str, dict[str, float]]:
    """model name -> its flat numeric metrics (task metrics unprefixed, regression set prefixed)."""
    out = {}
    for m in report.get("models", []):
        out[m["name"]] = {k: v for k, v in (m.get("metrics") or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


# --- register ---------------------------------------------------------------------------------


def registry_artifacts(c: Ctx) -> dict[str, Path]:
    arts: dict[str, Path] = {}
    for f in _export_outputs(c):
        if f.is_file():
            arts[f.name] = f
    for rel in ("ollama/Modelfile", "data/data_card.json", "run.yaml", "eval/report.json", "eval/report.md", "eval/report.html"):
        p = c.run_dir / rel
        if p.is_file():
            arts[Path(rel).name] = p
    if (c.run_dir / "train" / "adapter").is_dir():
        arts["adapter"] = c.run_dir / "train" / "adapter"
    return arts


def _register_inputs(c: Ctx) -> dict:
    return {s: c.output_hash(s) for s in ("train", "export", "ollama", "eval")} | {"name": c.model_name}


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("edgetune", "torch", "transformers", "peft", "mlx-lm", "gguf", "llama-cpp-python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    import subprocess

    with contextlib.suppress(Exception):
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if proc.returncode == 0:
            return proc.stdout.strip()
    return None


def _register_run(c: Ctx, resume: bool) -> dict:
    from . import registry

    arts = registry_artifacts(c)
    hashes = {rel: {"sha256": hash_path(p), "size": _size(p)} for rel, p in arts.items()}
    # the same finished run -> the same fingerprint -> no second entry
    fingerprint = _h({"model": c.manifest["model_fingerprint"], "adapter": c.output_hash("train"),
                      "gguf": {k: v for k, v in hashes.items() if k.endswith(".gguf")}})
    card = c.run_dir / "data" / "data_card.json"
    body = {
        "run_dir": str(c.run_dir.resolve()),
        "base_model": {"path": str(c.model_dir.resolve()), "fingerprint": c.manifest["model_fingerprint"]},
        "data": {"path": str(c.data_path), "card_sha256": sha256_file(card) if card.is_file() else None},
        "method": c.cfg.train.method,
        "train": to_dict(c.cfg.train),
        "export": to_dict(c.cfg.export),
        "metrics": c.manifest["stages"].get("eval", {}).get("summary", {}).get("metrics", {}),
        "ollama": {"modelfile": "Modelfile" if "Modelfile" in arts else None, "quant": c.modelfile_quant},
        "artifacts": hashes,
        "versions": _versions(),
        "git_commit": git_commit(),
    }
    texts = {}
    if "Modelfile" in arts:
        # the registry copy of the Modelfile points at the registry copy of its GGUF
        texts["Modelfile"] = _rebase_modelfile(arts.pop("Modelfile").read_text(encoding="utf-8"), c.gguf_path(c.modelfile_quant).name)
    for rel, text in texts.items():
        hashes[rel] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "size": len(text.encode())}
    entry, created = registry.register(c.model_name, body, arts, fingerprint, texts=texts)
    return {"ref": entry.ref, "path": str(entry.path), "created": created}


def _rebase_modelfile(text: str, gguf_name: str) -> str:
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.upper().startswith("FROM "):
            lines[i] = f"FROM ./{gguf_name}\n"
            break
    return "".join(lines)


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


PIPELINE: tuple[Stage, ...] = (
    Stage("data", _data_inputs, lambda c: [c.run_dir / "data" / n for n in ("train.jsonl", "valid.jsonl", "test.jsonl")], _data_run),
    Stage("train", _train_inputs, lambda c: [c.run_dir / "train" / "adapter" / "adapter_config.json"], _train_run),
    Stage("fuse", _fuse_inputs, lambda c: [c.run_dir / "fused" / "config.json"], _fuse_run),
    Stage("export", _export_inputs, _export_outputs, _export_run),
    Stage("ollama", _ollama_inputs, lambda c: [c.run_dir / "ollama" / "Modelfile"], _ollama_run),
    Stage("eval", _eval_inputs, lambda c: [c.run_dir / "eval" / "report.json"], _eval_run),
    Stage("register", _register_inputs, lambda c: [Path(c.manifest["stages"].get("register", {}).get("summary", {}).get("path") or c.run_dir / "-")], _register_run),
)
# what each stage's output hash covers (None: the stage's summary is its output)
OUTPUT_PATHS: dict[str, Callable[[Ctx], list[Path]]] = {
    "data": lambda c: [c.run_dir / "data"],
    "train": lambda c: [c.run_dir / "train" / "adapter"],
    "fuse": lambda c: [c.run_dir / "fused"],
    "export": _export_outputs,
    "ollama": lambda c: [c.run_dir / "ollama"],
    "eval": lambda c: [c.run_dir / "eval" / "report.json"],
}


# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    cfg: RunConfig
    manifest: dict
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def stage(self, name: str) -> dict:
        return self.manifest["stages"].get(name, {}).get("summary", {})


def _save_manifest(c: Ctx) -> None:
    write_json(c.run_dir / MANIFEST, c.manifest)


@contextlib.contextmanager
def _lock(run_dir: Path) -> Iterator[None]:
    """One `edgetune run` per run folder at a time (a stale lock from a killed run is taken over)."""
    lock = run_dir / ".lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise EdgetuneError(f"Another edgetune run (pid {pid}) is using {run_dir}.", where=str(lock),
                                fix="wait for it to finish, or stop it") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """`kill` (SIGTERM) unwinds like Ctrl-C, so the manifest records the interruption."""
    try:
        prev = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def check_export_plan(cfg: RunConfig) -> None:
    """Fail before training, not after it, on export settings that cannot work."""
    with contextlib.suppress(ImportError, AttributeError):
        from .export.quantize import normalize_qtype

        for q in cfg.export.quants:
            normalize_qtype(q)
    if cfg.ollama.quant and cfg.ollama.quant not in [cfg.export.outtype, *cfg.export.quants]:
        raise EdgetuneError(
            f"ollama.quant = {cfg.ollama.quant} is not exported (export.quants = {cfg.export.quants}).",
            fix=f"add {cfg.ollama.quant} to export.quants or set ollama.quant to one of them",
        )


def prepare_run(cfg: RunConfig) -> Ctx:
    """Resolve paths, write RUN/run.yaml (before any stage runs) and load or start the manifest."""
    model_dir = require_model(resolve_model(cfg.model), cfg.model)
    data_path = resolve_data(cfg.data.path)
    if not data_path.exists():
        raise EdgetuneError(f"Training data not found: {data_path}", where=str(data_path), fix="fix data.path in the recipe")
    check_export_plan(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "run.yaml", f"# effective settings of this run (edgetune run {run_dir})\n" + dump_yaml(cfg))
    manifest_path = run_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    manifest.setdefault("stages", {})
    manifest["run_dir"] = str(run_dir)
    manifest["model_dir"] = str(model_dir)
    manifest["data_path"] = str(data_path)
    manifest["model_fingerprint"] = model_fingerprint(model_dir)
    return Ctx(cfg, run_dir, model_dir, data_path, manifest)


def run(
    cfg: RunConfig,
    from_stage: str | None = None,
    to_stage: str | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Run (or continue) every stage of ``cfg``; return what ran and the manifest."""
    for s in (from_stage, to_stage):
        if s and s not in STAGES:
            raise EdgetuneError(f"Unknown stage '{s}'.", fix=f"stages: {', '.join(STAGES)}")
    c = prepare_run(cfg)
    if log:
        c.log = log
    result = RunResult(c.run_dir, cfg, c.manifest)
    force_from = STAGES.index(from_stage) if from_stage else len(STAGES)
    stop = STAGES.index(to_stage) if to_stage else len(STAGES) - 1
    with _lock(c.run_dir), _sigterm_as_interrupt():
        for i, stage in enumerate(PIPELINE[: stop + 1]):
            rec = c.manifest["stages"].get(stage.name, {})
            inputs_hash = _h(stage.inputs(c))
            outputs_ok = all(p.exists() for p in stage.outputs(c))
            if i < force_from and rec.get("status") == "done" and rec.get("inputs_hash") == inputs_hash and outputs_ok:
                c.log(f"[dim]· {stage.name:<8} up to date, skipped[/]")
                result.skipped.append(stage.name)
                continue
            # continue an interrupted stage (same inputs) where it can: training resumes from its checkpoint
            resume = (
                i < force_from
                and rec.get("status") in ("running", "interrupted", "failed")
                and rec.get("inputs_hash") == inputs_hash
            )
            c.log(f"[bold]▶ {stage.name:<8}[/] {STAGE_HELP[stage.name]}" + (" [yellow](resuming)[/]" if resume else ""))
            started = time.time()
            c.manifest["stages"][stage.name] = {"status": "running", "inputs_hash": inputs_hash, "started": _now()}
            _save_manifest(c)
            try:
                summary = stage.run(c, resume)
            except BaseException as exc:
                # Ctrl-C / SIGTERM, or training's own graceful stop (it checkpoints, then exits 130)
                interrupted = isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", None) == 130
                c.manifest["stages"][stage.name].update(
                    status="interrupted" if interrupted else "failed",
                    seconds=round(time.time() - started, 1),
                    error=None if interrupted else (exc.message if isinstance(exc, EdgetuneError) else "".join(traceback.format_exception_only(type(exc), exc)).strip()),
                )
                _save_manifest(c)
                raise
            rec = c.manifest["stages"][stage.name]
            rec.update(status="done", finished=_now(), seconds=round(time.time() - started, 1), summary=summary)
            paths = OUTPUT_PATHS.get(stage.name)
            rec["output_hash"] = _h([hash_path(p) for p in paths(c) if p.exists()]) if paths else _h(summary)
            _save_manifest(c)
            result.ran.append(stage.name)
            c.log(f"[green]✓ {stage.name:<8}[/] {rec['seconds']:.1f}s")
    return result


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------
# plan


def count_parameters(model_dir: Path) -> int | None:
    """Parameter count from safetensors headers (no weights are read)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                size = 1
                for d in shape:
                    size *= d
                n += size
    return n


@dataclass
class Plan:
    cfg: RunConfig
    stages: list[tuple[str, str, str]]  # (name, what, status: will run / done / unavailable)
    backend: str | None
    backend_reason: str | None
    memory: Any
    disk_bytes: int | None
    params: int | None
    notes: list[str]


def plan(cfg: RunConfig) -> Plan:
    """What ``run(cfg)`` would do on this machine, without doing any of it."""
    notes: list[str] = []
    model_dir = resolve_model(cfg.model) if cfg.model else None
    have_model = bool(model_dir and (model_dir / "config.json").is_file())
    if not have_model:
        notes.append(f"base model folder not found: {model_dir} — memory and disk figures need it")
    backend = reason = None
    try:
        from .train.select import choose_backend

        ch = choose_backend(cfg.train.backend, cfg.train.method)
        backend, reason = f"{ch.backend} ({ch.device})", ch.reason
    except EdgetuneError as exc:
        notes.append(f"training cannot run here: {exc.message}" + (f" — {exc.fix}" if exc.fix else ""))
    memory = None
    if have_model:
        try:
            from .train import estimate_memory

            memory = estimate_memory(model_dir, cfg.train)
        except (ImportError, AttributeError):
            notes.append("memory estimate unavailable (edgetune.train.estimate_memory is not in this build)")
        except EdgetuneError as exc:
            notes.append(f"memory estimate failed: {exc.message}")
    params = count_parameters(model_dir) if have_model else None
    disk = None
    if params:
        weights_disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        types = [cfg.export.outtype] + [q for q in cfg.export.quants if q != cfg.export.outtype]
        from .export.qtypes import bits_per_weight

        gguf = sum(int(params * bits_per_weight(t) / 8) for t in types)
        adapter_and_ckpts = int(params * 0.02 * 4 * 3)  # a rank-16 adapter is ~1% of weights; keep 3 copies with optimizer state
        disk = weights_disk + gguf + adapter_and_ckpts  # fused model ~ the base weights again
    stages = []
    run_dir = cfg.run_dir
    manifest = read_json(run_dir / MANIFEST) if (run_dir / MANIFEST).is_file() else {"stages": {}}
    for name in STAGES:
        status = manifest["stages"].get(name, {}).get("status")
        stages.append((name, STAGE_HELP[name], {"done": "done (will be skipped if inputs are unchanged)"}.get(status, status or "will run")))
    return Plan(cfg, stages, backend, reason, memory, disk, params, notes)


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return load_config(find_recipe(recipe), overrides)


def replace(cfg: RunConfig, **top: Any) -> RunConfig:
    return dataclasses.replace(cfg, **top)


__all__ = [
    "STAGES", "RunResult", "Plan", "run", "plan", "load_recipe", "find_recipe", "load_run_config",
    "demo_data_path", "recipes_dir", "model_fingerprint",
]
