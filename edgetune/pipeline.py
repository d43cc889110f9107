"""`edgetune run`: every stage of a recipe in order, skipping what is already done.

The run folder (:class:`edgetune.runfolder.RunFolder`) is the contract between stages. Each stage
is one row of :data:`edgetune.stages.STAGE_TABLE` (name, order, folder, what it reads, when it is
enabled); :data:`PIPELINE` attaches its functions here, each a thin call to the same function its CLI command uses
(``data.prepare``, ``train.train``, ``fuse.fuse``, ``export_model``, the Modelfile writer,
``eval.evaluate``, ``registry.register_run``), so a recipe field and the matching flag cannot
diverge.

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
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, dump_yaml, to_dict
from .console import console
from .errors import EdgetuneError
from .io import read_json, sha256_file, sha256_json, sha256_path, write_json, write_text
from .model_dir import model_fingerprint
from .qtypes import AUTO, normalize_qtype
from .recipes import (  # noqa: F401  (re-exported: the pipeline's public names)
    DEMO,
    DEMO_DATA,
    demo_data_path,
    find_recipe,
    load_recipe,
    recipes_dir,
    require_model,
    resolve_data,
    resolve_model,
)
from .runfolder import RunFolder, report_metrics
from .stages import STAGE, STAGE_TABLE, STAGES, StageRow, stage_help
from .tensors import count_parameters


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The effective config of an existing run folder (what later commands read)."""
    return RunFolder.open(run_dir).cfg


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Ctx:
    cfg: RunConfig
    run: RunFolder
    model_dir: Path
    data_path: Path
    manifest: dict
    log: Callable[[str], None] = console.print

    def output_hash(self, stage: str) -> str | None:
        return self.manifest["stages"].get(stage, {}).get("output_hash")

    @property
    def run_dir(self) -> Path:
        return self.run.root


def _api(module: str, attr: str, stage: str):
    """Import a stage's function lazily; a missing stage says so instead of failing obscurely."""
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        i = STAGES.index(stage)
        raise EdgetuneError(
            f"Stage '{stage}' is unavailable in this build: {module}.{attr} could not be loaded ({exc}).",
            fix=f"run the stages before it with `--to {STAGES[i - 1]}`" if i else None,
        ) from None


# --- data -------------------------------------------------------------------------------------


def _data_inputs(c: Ctx) -> dict:
    return {"cfg": to_dict(c.cfg.data) | {"path": None}, "source": sha256_path(c.data_path), "model": c.manifest["model_fingerprint"]}


def _data_run(c: Ctx, resume: bool) -> dict:
    prepare = _api("edgetune.data", "prepare", "data")
    card = prepare(c.data_path, c.run.data_dir, c.cfg.data, model_dir=c.model_dir)
    counts = {k: card.get(k) for k in ("splits", "counts") if isinstance(card, dict) and k in card}
    return {"card": str(c.run.data_card), **counts}


# --- train ------------------------------------------------------------------------------------


def _train_inputs(c: Ctx) -> dict:
    return {"cfg": to_dict(c.cfg.train), "model": c.manifest["model_fingerprint"], "data": c.output_hash("data"),
            "chat_template": c.cfg.data.chat_template}


def _train_run(c: Ctx, resume: bool) -> dict:
    train = _api("edgetune.train", "train", "train")
    out = c.run.train_dir
    if not resume and out.exists():
        # inputs changed (or --from train): the old checkpoints belong to another run
        import shutil

        shutil.rmtree(out)
    # the data stage rendered the chats with data.chat_template: training must use the same one
    result = train(c.model_dir, c.run.data_dir, out, c.cfg.train, resume=resume, chat_template=c.cfg.data.chat_template)
    summary: dict[str, Any] = {"adapter": str(c.run.adapter_dir), "resumed": resume}
    if hasattr(result, "as_dict"):
        result = result.as_dict()
    if isinstance(result, dict):
        summary.update({k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "adapter_dir"})
    return summary


# --- align (optional: DPO/ORPO/GRPO after SFT) ------------------------------------------------------


def _align_inputs(c: Ctx) -> dict:
    a = c.cfg.align
    if not a.enabled:
        return {"off": True}
    return {"cfg": to_dict(a) | {"data": None}, "source": sha256_path(resolve_data(a.data)), "sft": c.output_hash("train"),
            "data_cfg": to_dict(c.cfg.data) | {"path": None}, "model": c.manifest["model_fingerprint"]}


def _align_outputs(c: Ctx) -> list[Path]:
    r = c.run
    return [r.align_adapter_dir / "adapter_config.json", r.sft_model_dir / "config.json"] if r.aligned else []


def _align_run(c: Ctx, resume: bool) -> dict:
    align = _api("edgetune.align", "align", "align")
    return align(c.run, c.model_dir, resume=resume, log=c.log)


# --- fuse -------------------------------------------------------------------------------------


def _fuse_inputs(c: Ctx) -> dict:
    return {"model": c.manifest["model_fingerprint"], "adapter": c.output_hash("train"), "align": c.output_hash("align"),
            "chat_template": c.cfg.data.chat_template}


def _fuse_run(c: Ctx, resume: bool) -> dict:
    fuse = _api("edgetune.fuse", "fuse", "fuse")
    r = c.run  # after align: its adapter on the SFT-merged model; else the train adapter on the base
    base = r.sft_model_dir if r.aligned else c.model_dir
    # the adapter learnt the template the data was rendered with: the fused model (and its GGUFs) carry it
    fuse(base, r.final_adapter_dir, r.fused_dir, chat_template=c.cfg.data.chat_template)
    return {"fused": str(r.fused_dir), "adapter": str(r.final_adapter_dir)}


# --- export -----------------------------------------------------------------------------------


def _export_inputs(c: Ctx) -> dict:
    e = c.cfg.export
    imatrix = sha256_file(e.imatrix) if e.imatrix and Path(e.imatrix).is_file() else e.imatrix
    calib = e.calib or c.run.split("train")  # export.imatrix: auto reads it (and auto's held-out the valid split)
    return {"cfg": to_dict(e), "imatrix": imatrix, "name": c.run.model_name, "fused": c.output_hash("fuse"),
            "calib": sha256_file(calib) if Path(calib).is_file() else None}


def _export_adapter_route(c: Ctx) -> dict:
    """export.route: adapter — the adapter as a GGUF on the unmodified source GGUF, checked against training."""
    from .data.template import load_tokenizer
    from .export.adapter import export_adapter
    from .export.source_route import heldout_token_lists, require_source, verify_on_source

    run = c.run
    if run.aligned:
        raise EdgetuneError(
            "export.route = adapter ships one adapter on the source GGUF (Ollama takes one adapter per model), "
            "but this run's align stage trains a second adapter on the SFT-merged model.",
            fix="drop the align: section, or use export.route: merge (the GGUFs then hold both adapters merged)")
    src = require_source(run.base_model_dir)
    out = export_adapter(run.base_model_dir, run.adapter_dir, run.adapter_gguf)
    size = out.stat().st_size
    summary: dict[str, Any] = {
        "route": "adapter", "adapter_gguf": str(out), "gguf": {"adapter": str(out)},
        "source": {"kind": src.kind, "path": str(src.path), "name": src.name, "file_type": src.file_type},
        "sizes_mb": {"adapter": round(size / 2**20, 2), "source": round(src.path.stat().st_size / 2**20, 1)},
        "adapter_share": round(size / src.path.stat().st_size, 4),
    }
    if c.cfg.export.verify:
        tok = load_tokenizer(run.base_model_dir, chat_template=c.cfg.data.chat_template)
        held = run.split("test") if run.split("test").is_file() else run.split("valid")
        summary["verify"] = verify_on_source(run.base_model_dir, run.adapter_dir, src.path, out,
                                             heldout_token_lists(tok, held))
    return summary


def _export_run(c: Ctx, resume: bool) -> dict:
    if c.cfg.export.route == "adapter":
        return _export_adapter_route(c)
    export_model = _api("edgetune.quant.build", "export_model", "export")
    kwargs = _api("edgetune.quant.build", "export_run_kwargs", "export")(c.cfg.export, c.run)  # as `edgetune export RUN`
    res = export_model(c.run.fused_dir, c.run.gguf_dir, c.cfg.export.quants, name=c.run.model_name, **kwargs)
    files = {t: str(p) for t, p in res["files"].items()}
    summary: dict[str, Any] = {"gguf": files, "sizes_mb": {k: round(Path(v).stat().st_size / 2**20, 1) for k, v in files.items()}}
    if res.get("imatrix"):  # which data and how many tokens made the importance matrix
        summary["imatrix"] = res["imatrix"]
    if res.get("auto"):
        summary["auto"] = {"chosen": res["auto"]["chosen"], "reason": res["auto"]["reason"], "table": str(res["auto"]["report"])}
    if res.get("drift"):  # each quantized file vs the unquantized export, as `edgetune export` prints it
        summary["drift"] = {r.label: {"top1": round(r.top1, 4), "mean_kl": round(r.mean_kl, 5)} for r in res["drift"]}
    return summary


# --- ollama -----------------------------------------------------------------------------------


def _ollama_inputs(c: Ctx) -> dict:
    return {"cfg": to_dict(c.cfg.ollama), "name": c.run.model_name, "quant": c.run.modelfile_quant, "export": c.output_hash("export")}


def _ollama_run(c: Ctx, resume: bool) -> dict:
    build_modelfile = _api("edgetune.ollama.modelfile", "build_modelfile", "ollama")
    options = _api("edgetune.ollama.modelfile", "ModelfileOptions", "ollama")
    run = c.run
    gguf = run.gguf(run.modelfile_quant)
    extra: dict[str, Any] = {}
    if run.adapter_route:  # FROM the model the user already runs (its Ollama name, or the source file) + ADAPTER
        from .export.source_route import require_source

        src = require_source(run.base_model_dir)
        gguf = src.path
        extra = {"adapter_gguf": run.adapter_gguf, "from_name": src.ollama_name}
    if not gguf.is_file():
        raise EdgetuneError(
            f"ollama.quant = {run.modelfile_quant} but {gguf.name} was not exported.",
            fix=f"add {run.modelfile_quant} to export.quants or set ollama.quant to one of {c.cfg.export.quants}",
        )
    o = c.cfg.ollama
    # the same options and the same writer as `edgetune ollama RUN`; SYSTEM None: the training data's
    # dominant system prompt. A family template that does not reproduce the chat template raises here;
    # a custom ollama.template is checked and reported, not refused (as the command does).
    opts = options.from_config(o, model_dir=run.fused_dir, train_data=run.split("train"), **extra)
    text, check = build_modelfile(gguf, run.ollama_dir, run.model_name, opts)
    modelfile = write_text(run.modelfile, text)
    summary: dict[str, Any] = {"modelfile": str(modelfile), "gguf": str(gguf)}
    if check is None:
        summary["check"] = "off (ollama.check: false)" if not o.check else "skipped (no chat template)"
    elif check.ok:
        summary["check"] = f"pass ({check.n_identical} conversations token-identical)"
    else:
        summary["check"] = f"DIFFERENT: the custom template does not render the chat template (edgetune ollama check {run.root})"
        c.log(f"[yellow]warning:[/] {summary['check']}")
    if o.create:
        create = _api("edgetune.ollama_client", "ollama_create", "ollama")
        prompt = run.sample_prompt()  # a prompt of the user's own task, not a generic greeting
        res = create(modelfile, run.model_name, **({"prompt": prompt} if prompt else {}))
        summary["create"] = {"ran": res.ran, "command": res.command, "message": res.message, "answer": res.answer}
    return summary


# --- eval -------------------------------------------------------------------------------------


def _eval_inputs(c: Ctx) -> dict:
    from .eval.data import regression_hashes

    data, pref = c.run.eval_data, c.run.preference_data
    return {
        "cfg": to_dict(c.cfg.eval),
        "regression": regression_hashes(c.cfg.eval.regression),  # a user's regression file edited: eval again
        "data": sha256_path(data) if data.exists() else None,
        "preference_data": sha256_path(pref) if pref and pref.exists() else None,
        "align": c.output_hash("align"),
        "model": c.manifest["model_fingerprint"],
        "fused": c.output_hash("fuse"),
        "export": c.output_hash("export"),
    }


def _eval_run(c: Ctx, resume: bool) -> dict:
    evaluate = _api("edgetune.eval", "evaluate", "eval")
    from .runfolder import fitted_eval_specs

    specs, rows = fitted_eval_specs(c.run)  # the hf runner where the model fits in memory, else GGUFs
    pref = c.run.preference_data
    cfg = dataclasses.replace(c.cfg.eval, preference_data=str(pref) if pref else None)
    report = evaluate(c.run.eval_data, [f"{k}={v}" for k, v in specs.items()], c.run.eval_dir, cfg,
                      baseline=c.cfg.eval.baseline or "base", runner_choice=rows.as_dict(),
                      train_data=c.run.split("train") if c.cfg.eval.data else None)  # a golden set: held out?
    gates = report.get("gates") or {}
    summary = {
        "specs": specs,
        "runner_choice": rows.as_dict(),
        "headline": report.get("headline"),
        "n_examples": report.get("n_examples"),
        "metrics": report_metrics(report),
        "gates_passed": gates.get("passed", True),
        "report": str(c.run.eval_report("md")),
    }
    if not summary["gates_passed"]:
        # the run stops here: a model that fails its gates is not registered
        c.manifest["stages"]["eval"]["summary"] = summary
        from .eval.gates import describe

        failed = "; ".join(describe(f) for f in gates.get("failures", [])) or "see the report"
        raise EdgetuneError(f"Eval gates failed: {failed}", where=summary["report"], fix="improve the model or relax eval.gates / eval.max / eval.max_regression")
    return summary


# --- register ---------------------------------------------------------------------------------


def _register_inputs(c: Ctx) -> dict:
    return {s: c.output_hash(s) for s in STAGE["register"].reads} | {"name": c.run.model_name}


def _register_run(c: Ctx, resume: bool) -> dict:
    register_run = _api("edgetune.registry", "register_run", "register")
    _save_manifest(c)  # register_run reads the base model, data and eval verdict from the manifest
    entry, created = register_run(c.run)  # metrics: from RUN/eval/report.json, as `edgetune models register` reads them
    return {"ref": entry.ref, "path": str(entry.path), "created": created}


def _register_outputs(c: Ctx) -> list[Path]:
    return [Path(c.manifest["stages"].get("register", {}).get("summary", {}).get("path") or c.run_dir / "-")]


# --------------------------------------------------------------------------------------------
# the stage table: one row per stage


@dataclass(frozen=True)
class Stage:
    row: StageRow  # name, what it does, folder, reads, enabled (edgetune/stages.py)
    inputs: Callable[[Ctx], dict]  # what the input hash covers
    outputs: Callable[[Ctx], list[Path]]  # must all exist for the stage to count as done
    run: Callable[[Ctx, bool], dict]  # (ctx, resume) -> summary recorded in the manifest
    hashed: Callable[[Ctx], list[Path]] | None = None  # what the output hash covers (None: the summary)

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def help(self) -> str:
        return stage_help(self.row)


# stage name -> (inputs, outputs, run, hashed); the rows, their order and their columns: STAGE_TABLE
_FUNCTIONS: dict[str, tuple] = {
    "data": (_data_inputs, lambda c: [c.run.split(s) for s in ("train", "valid", "test")], _data_run,
             lambda c: [c.run.data_dir]),
    "train": (_train_inputs, lambda c: [c.run.adapter_dir / "adapter_config.json"], _train_run, lambda c: [c.run.adapter_dir]),
    "align": (_align_inputs, _align_outputs, _align_run, lambda c: [c.run.align_adapter_dir] if c.run.aligned else []),
    "fuse": (_fuse_inputs, lambda c: [c.run.fused_dir / "config.json"], _fuse_run, lambda c: [c.run.fused_dir]),
    "export": (_export_inputs, lambda c: c.run.ggufs, _export_run, lambda c: c.run.ggufs),
    "ollama": (_ollama_inputs, lambda c: [c.run.modelfile], _ollama_run, lambda c: [c.run.ollama_dir]),
    "eval": (_eval_inputs, lambda c: [c.run.eval_report("json")], _eval_run, lambda c: [c.run.eval_report("json")]),
    "register": (_register_inputs, _register_outputs, _register_run, None),
}
PIPELINE: tuple[Stage, ...] = tuple(Stage(row, *_FUNCTIONS[row.name]) for row in STAGE_TABLE)
STAGE_HELP = {s.name: s.help for s in PIPELINE}


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
    write_json(c.run.manifest_path, c.manifest)


@contextlib.contextmanager
def _lock(run: RunFolder) -> Iterator[None]:
    """One `edgetune run` per run folder at a time (a stale lock from a killed run is taken over)."""
    lock = run.lock_path
    run.root.mkdir(parents=True, exist_ok=True)
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
            raise EdgetuneError(f"Another edgetune run (pid {pid}) is using {run.root}.", where=str(lock),
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
    for q in cfg.export.quants:
        if q != AUTO:
            normalize_qtype(q)
    if AUTO in cfg.export.quants and cfg.ollama.quant:
        raise EdgetuneError(f"export.quants = [auto] picks the Modelfile's type, but ollama.quant = {cfg.ollama.quant}.",
                            fix="remove ollama.quant, or list the types in export.quants")
    if cfg.ollama.quant and cfg.ollama.quant not in [cfg.export.outtype, *cfg.export.quants]:
        raise EdgetuneError(
            f"ollama.quant = {cfg.ollama.quant} is not exported (export.quants = {cfg.export.quants}).",
            fix=f"add {cfg.ollama.quant} to export.quants or set ollama.quant to one of them",
        )
    if cfg.export.imatrix not in (None, "auto", "off") and not Path(cfg.export.imatrix).is_file():
        raise EdgetuneError(f"export.imatrix file not found: {cfg.export.imatrix}", where=cfg.export.imatrix,
                            fix="point export.imatrix at an importance matrix file (edgetune export imatrix / llama-imatrix), or use auto / off")


def prepare_run(cfg: RunConfig) -> Ctx:
    """Resolve paths, write RUN/run.yaml (before any stage runs) and load or start the manifest."""
    model_dir = require_model(resolve_model(cfg.model), cfg.model)
    data_path = resolve_data(cfg.data.path)
    if not data_path.exists():
        raise EdgetuneError(f"Training data not found: {data_path}", where=str(data_path), fix="fix data.path in the recipe")
    check_export_plan(cfg)
    if cfg.eval.regression:  # the user's regression files are read (and bad rows refused) before training
        from .eval.data import load_regression

        load_regression(cfg.eval.regression)
    run = RunFolder(cfg.run_dir, cfg)
    run.root.mkdir(parents=True, exist_ok=True)
    write_text(run.run_yaml, f"# effective settings of this run (edgetune run {run.root})\n" + dump_yaml(cfg))
    manifest = read_json(run.manifest_path) if run.manifest_path.is_file() else {}
    manifest.setdefault("stages", {})
    manifest["run_dir"] = str(run.root)
    manifest["model_dir"] = str(model_dir.resolve())  # absolute: later commands may run from elsewhere
    manifest["data_path"] = str(data_path.resolve())
    manifest["model_fingerprint"] = model_fingerprint(model_dir)
    return Ctx(cfg, run, model_dir, data_path, manifest)


def run(
    cfg: RunConfig,
    from_stage: str | None = None,
    to_stage: str | None = None,
    log: Callable[[str], None] | None = None,
    force: bool = False,
) -> RunResult:
    """Run (or continue) every stage of ``cfg``; return what ran and the manifest. A stage that cannot
    fit in this machine's memory is refused before the first stage starts (``force`` skips the check)."""
    for s in (from_stage, to_stage):
        if s and s not in STAGES:
            raise EdgetuneError(f"Unknown stage '{s}'.", fix=f"stages: {', '.join(STAGES)}")
    if not force:
        i, j = STAGES.index(from_stage) if from_stage else 0, STAGES.index(to_stage) if to_stage else len(STAGES) - 1
        # imatrix is sized as its own row but runs inside export
        check_fits(cfg, [*STAGES[i: j + 1], *(["imatrix"] if "export" in STAGES[i: j + 1] else [])])
    c = prepare_run(cfg)
    if log:
        c.log = log
    result = RunResult(c.run_dir, cfg, c.manifest)
    force_from = STAGES.index(from_stage) if from_stage else len(STAGES)
    stop = STAGES.index(to_stage) if to_stage else len(STAGES) - 1
    with _lock(c.run), _sigterm_as_interrupt():
        for i, stage in enumerate(PIPELINE[: stop + 1]):
            rec = c.manifest["stages"].get(stage.name, {})
            inputs_hash = sha256_json(stage.inputs(c))
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
            c.log(f"[bold]▶ {stage.name:<8}[/] {stage.help}" + (" [yellow](resuming)[/]" if resume else ""))
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
            hashed = stage.hashed(c) if stage.hashed else None
            rec["output_hash"] = sha256_json([sha256_path(p) for p in hashed if p.exists()]) if hashed is not None else sha256_json(summary)
            _save_manifest(c)
            result.ran.append(stage.name)
            c.log(f"[green]✓ {stage.name:<8}[/] {rec['seconds']:.1f}s")
    return result


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------
# plan


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
    stages_cost: Any = None  # edgetune.stageplan.StagePlan: each stage's memory, disk, time and fit



def plan(cfg: RunConfig, target=None) -> Plan:
    """What ``run(cfg)`` would do on this machine (or on ``target``, an edgetune.stageplan.Target),
    without doing any of it."""
    notes: list[str] = []
    model_dir = resolve_model(cfg.model) if cfg.model else None
    have_model = bool(model_dir and (model_dir / "config.json").is_file())
    if not have_model:
        notes.append(f"base model folder not found: {model_dir} — memory and disk figures need it")
    backend = reason = None
    try:
        from .train.select import choose_backend
        from .train.support import resolve

        ch = choose_backend(cfg.train.backend, cfg.train.method)
        backend, reason = f"{ch.backend} ({ch.device})", ch.reason
        resolve(cfg.train, ch.backend)  # a setting this backend refuses (train/support.py)
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
        from .qtypes import bits_per_weight

        gguf = sum(int(params * bits_per_weight(t) / 8) for t in types)
        adapter_and_ckpts = int(params * 0.02 * 4 * 3)  # a rank-16 adapter is ~1% of weights; keep 3 copies with optimizer state
        disk = weights_disk + gguf + adapter_and_ckpts  # fused model ~ the base weights again
    stages = []
    manifest = RunFolder(cfg.run_dir, cfg).manifest()
    for st in PIPELINE:
        status = manifest["stages"].get(st.name, {}).get("status")
        if not st.row.enabled(cfg):
            status = f"off (runs {st.row.when})"
        stages.append((st.name, st.help, {"done": "done (will be skipped if inputs are unchanged)"}.get(status, status or "will run")))
    from . import stageplan

    costs = stageplan.plan_stages(cfg, model_dir, target or stageplan.this_machine())
    if costs is None:
        notes.append("per-stage memory, disk and time need the model's config.json (or a model named in "
                      "edgetune/stageplan.py KNOWN_MODELS)")
    elif not have_model:
        notes.append(f"sized from {costs.shape_source}: {cfg.model}")
    return Plan(cfg, stages, backend, reason, memory, disk, params, notes, costs)


def check_fits(cfg: RunConfig, stages: list[str] | None = None) -> None:
    """Refuse, before any stage starts, a run whose stages cannot fit this machine's memory
    (edgetune/stageplan.py), naming the numbers and the fix."""
    from . import stageplan

    model_dir = resolve_model(cfg.model) if cfg.model else None
    done = {k for k, v in RunFolder(cfg.run_dir, cfg).manifest()["stages"].items() if v.get("status") == "done"}
    stages = [s for s in (stages or [*STAGES, "imatrix"]) if s not in done and not (s == "imatrix" and "export" in done)]
    try:
        p = stageplan.plan_stages(cfg, model_dir, stageplan.this_machine(), stages=stages)
    except EdgetuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - a sizing bug must not stop a run that may well fit
        console.print(f"[yellow]warning: could not size the stages ({exc}); running without the memory check[/]")
        return
    bad = stageplan.refusal(p) if p else None
    if bad:
        raise EdgetuneError(f"This run cannot fit: {bad[0]}.", fix=bad[1])


def replace(cfg: RunConfig, **top: Any) -> RunConfig:
    return dataclasses.replace(cfg, **top)


__all__ = [
    "STAGES", "RunResult", "Plan", "run", "plan", "check_fits", "load_recipe", "find_recipe", "load_run_config",
    "demo_data_path", "recipes_dir", "model_fingerprint",
]
