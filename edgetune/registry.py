"""The model registry: every model a run produced, under ``<home>/<name>/<version>/``.

Layout (``home`` is :func:`edgetune.paths.home`, i.e. ``$EDGETUNE_HOME`` or ``./models``)::

    <home>/<name>/v1/manifest.yaml   base model, data card hash, method + hyper-parameters,
                                     metrics, artifacts (sha256, size), versions, git commit, time
    <home>/<name>/v1/<artifacts>     GGUFs (hard-linked when possible), Modelfile, adapter/, eval report
    <home>/<name>/v1/published.yaml  where the model was published (``edgetune publish``), appended to

Versions only ever increase and a version's model is never rewritten: a new entry is built in a
hidden temp folder and renamed into place, and the rename refuses an existing version. Only
``published.yaml``, the log of where those very files went, is added to later. A run is
identified by a fingerprint of its artifacts, so registering the same finished run twice returns
the existing entry instead of adding a second one.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import EdgetuneError
from .paths import home

MANIFEST = "manifest.yaml"
PUBLISHED = "published.yaml"
LAST_VERSION = ".last_version"
BASE_DIR = "base"  # <home>/base holds base models (the demo model), never registry entries
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Entry:
    name: str
    version: int
    path: Path
    manifest: dict

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"


def check_name(name: str) -> str:
    if not _NAME_RE.match(name or "") or name == BASE_DIR:
        raise EdgetuneError(
            f"'{name}' is not a valid model name.",
            fix="use letters, digits, '.', '_' or '-' (up to 64 characters, not 'base')",
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name``, ``name:3`` or ``name:v3`` -> (name, version or None for the latest)."""
    name, _, ver = ref.partition(":")
    check_name(name)
    if not ver or ver == "latest":
        return name, None
    m = re.fullmatch(r"v?(\d+)", ver)
    if not m:
        raise EdgetuneError(f"'{ref}' has no valid version.", fix="write NAME, NAME:3 or NAME:v3")
    return name, int(m.group(1))


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    out = []
    for d in model_dir.iterdir():
        m = re.fullmatch(r"v(\d+)", d.name)
        if m and (d / MANIFEST).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def _load(path: Path) -> dict:
    try:
        return yaml.safe_load((path / MANIFEST).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise EdgetuneError(f"Registry manifest is not valid YAML: {exc}", where=str(path / MANIFEST)) from None


def list_entries(name: str | None = None, root: Path | None = None) -> list[Entry]:
    root = Path(root) if root else home()
    if not root.is_dir():
        return []
    names = [name] if name else sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != BASE_DIR and not d.name.startswith("."))
    entries = []
    for n in names:
        for v in _versions(root / n):
            p = root / n / f"v{v}"
            entries.append(Entry(n, v, p, _load(p)))
    return entries


def get(ref: str, root: Path | None = None) -> Entry:
    name, version = parse_ref(ref)
    entries = list_entries(name, root)
    if not entries:
        known = sorted({e.name for e in list_entries(None, root)})
        raise EdgetuneError(
            f"No registered model named '{name}'.",
            where=str(Path(root) if root else home()),
            fix=("registered: " + ", ".join(known)) if known else "produce one with `edgetune run RECIPE.yaml` or `edgetune quickstart`",
        )
    if version is None:
        return entries[-1]
    for e in entries:
        if e.version == version:
            return e
    raise EdgetuneError(
        f"'{name}' has no version v{version}.",
        fix="versions: " + ", ".join(f"v{e.version}" for e in entries),
    )


def find_by_fingerprint(name: str, fingerprint: str, root: Path | None = None) -> Entry | None:
    for e in list_entries(name, root):
        if e.manifest.get("fingerprint") == fingerprint:
            return e
    return None


def _last_version(model_dir: Path) -> int:
    """High-water mark: a removed version's number is never handed out again."""
    try:
        return int((model_dir / LAST_VERSION).read_text(encoding="utf-8").strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def place_file(src: Path, dst: Path) -> None:
    """Put a file into the registry without doubling disk use: hard link, else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def register(
    name: str,
    manifest: dict[str, Any],
    artifacts: dict[str, Path],
    fingerprint: str,
    root: Path | None = None,
    texts: dict[str, str] | None = None,
) -> tuple[Entry, bool]:
    """Add a new version of ``name`` holding ``artifacts`` (relative name -> file or folder)
    and ``texts`` (relative name -> file content, e.g. a Modelfile rewritten for its new place).

    Returns ``(entry, created)``; ``created`` is False when an entry with the same fingerprint
    already exists (the same finished run registered again).
    """
    check_name(name)
    root = Path(root) if root else home()
    existing = find_by_fingerprint(name, fingerprint, root)
    if existing:
        return existing, False
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".new.", dir=model_dir))
    try:
        for rel, src in artifacts.items():
            src = Path(src)
            if src.is_dir():
                for f in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
                    place_file(f, tmp / rel / f.relative_to(src))
            else:
                place_file(src, tmp / rel)
        for rel, text in (texts or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
        while True:
            taken = [int(m.group(1)) for d in model_dir.iterdir() if (m := re.fullmatch(r"v(\d+)", d.name))]
            version = max(taken + [_last_version(model_dir)]) + 1
            body = {
                "name": name,
                "version": version,
                "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                "fingerprint": fingerprint,
                **manifest,
            }
            (tmp / MANIFEST).write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")
            final = model_dir / f"v{version}"
            try:
                # mkdir is the lock: it fails if another process took this version first, and the
                # rename then lands on our own empty folder, so an existing version is never replaced.
                final.mkdir()
            except FileExistsError:
                continue
            os.replace(tmp, final)
            (model_dir / LAST_VERSION).write_text(str(max(version, _last_version(model_dir))), encoding="utf-8")
            return Entry(name, version, final, body), True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publications(entry: Entry) -> list[dict]:
    """Where ``entry`` was published, oldest first (``edgetune publish``: kind, target, time, files)."""
    p = entry.path / PUBLISHED
    if not p.is_file():
        return []
    try:
        return list(yaml.safe_load(p.read_text(encoding="utf-8")) or [])
    except yaml.YAMLError as exc:
        raise EdgetuneError(f"Registry publication log is not valid YAML: {exc}", where=str(p)) from None


def record_publication(entry: Entry, item: dict) -> None:
    """Append ``item`` to the entry's publication log (``published.yaml``, rewritten atomically)."""
    from .io import write_text

    write_text(entry.path / PUBLISHED, yaml.safe_dump(publications(entry) + [item], sort_keys=False, allow_unicode=True))


def entry_for_run(run, gguf_sha256: dict[str, str], root: Path | None = None) -> Entry | None:
    """The registry entry holding this run's GGUFs (``run``: a RunFolder; ``gguf_sha256``: GGUF file
    name -> sha256 as they are now), newest first; None when the run, as it is, is not registered."""
    where = str(Path(run.root).resolve())
    for e in reversed(list_entries(run.model_name, root)):
        arts = e.manifest.get("artifacts") or {}
        if e.manifest.get("run_dir") == where and all((arts.get(n) or {}).get("sha256") == h for n, h in gguf_sha256.items()):
            return e
    return None


def remove(ref: str, root: Path | None = None) -> list[Entry]:
    """Remove one version (``name:v2``; later versions keep counting up) or a whole model (``name``)."""
    name, version = parse_ref(ref)
    root = Path(root) if root else home()
    targets = [get(ref, root)] if version is not None else list_entries(name, root)
    if not targets:
        get(ref, root)  # raises the helpful "no such model" error
    for e in targets:
        trash = e.path.with_name(f".rm.{e.path.name}")
        os.replace(e.path, trash)  # disappear atomically, then delete
        shutil.rmtree(trash, ignore_errors=True)
    if version is None:  # the whole model is gone: its folder (and version counter) too
        shutil.rmtree(root / name, ignore_errors=True)
    return targets


# --------------------------------------------------------------------------------------------
# registering a finished run


def run_artifacts(run) -> dict[str, Path]:
    """What a run folder contributes to its registry entry: GGUFs, Modelfile, data card, run.yaml,
    eval reports and the adapters (entry-relative name -> file or folder): ``adapter`` is the train
    stage's (on the base model); a run with an align stage adds ``align_adapter``, trained on the base
    with ``adapter`` merged in, which is what the GGUFs hold."""
    arts: dict[str, Path] = {f.name: f for f in run.ggufs if f.is_file()}
    for p in (run.modelfile, run.data_card, run.run_yaml, run.eval_report("json"), run.eval_report("md"), run.eval_report("html")):
        if p.is_file():
            arts[p.name] = p
    if run.adapter_dir.is_dir():
        arts["adapter"] = run.adapter_dir
    if run.aligned and run.align_adapter_dir.is_dir():
        arts["align_adapter"] = run.align_adapter_dir
    return arts


def rebase_modelfile(text: str, gguf_name: str, *, adapter: bool = False) -> str:
    """The Modelfile with its FROM pointing at ``./gguf_name`` (the copy beside it in the entry); with
    ``adapter`` (the adapter route) FROM stays (the source the user runs) and ADAPTER points at ``./gguf_name``."""
    key = "ADAPTER " if adapter else "FROM "
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.upper().startswith(key):
            lines[i] = f"{key}./{gguf_name}\n"
            break
    return "".join(lines)


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("edgetune", "torch", "transformers", "peft", "mlx-lm", "gguf", "llama-cpp-python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """The edgetune source checkout's commit, when it is one."""
    import contextlib
    import subprocess

    with contextlib.suppress(Exception):
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if proc.returncode == 0:
            return proc.stdout.strip()
    return None


def register_run(run, *, metrics: dict | None = None, root: Path | None = None, force: bool = False) -> tuple[Entry, bool]:
    """Register the finished run folder ``run`` (a :class:`~edgetune.runfolder.RunFolder`).

    ``edgetune run``'s register stage and ``edgetune models register RUN`` both call this. The
    entry's fingerprint covers the base model, the adapter and the GGUFs, so the same finished run
    registered twice returns the existing entry. Its Modelfile points at the entry's own GGUF.
    ``metrics`` default to the run's eval report. A run that failed its eval gates is refused unless
    ``force``; a forced entry records that its gates failed (``eval_gates``).
    """
    import hashlib

    from .config import to_dict
    from .io import sha256_file, sha256_json, sha256_path, size_of
    from .model_dir import model_fingerprint

    cfg = run.cfg
    ran = run.manifest()
    verdict = ran.get("stages", {}).get("eval", {}).get("summary", {}).get("gates_passed")
    if verdict is False and not force:  # the register stage never runs after failed gates; neither does this
        raise EdgetuneError(f"{run.root} failed its eval gates; a model that fails them is not registered.",
                            where=str(run.eval_report("md")),
                            fix="improve the model or relax eval.gates / eval.max / eval.max_regression, then re-run "
                                "(`edgetune models register RUN --force` registers it anyway, marked as failing its gates)")
    base = run.base_model_dir
    base_fp = ran.get("model_fingerprint") or model_fingerprint(base)
    arts = run_artifacts(run)
    if not any(k.endswith(".gguf") for k in arts):
        raise EdgetuneError(f"{run.root} has no exported GGUF to register.", where=str(run.gguf_dir),
                            fix=f"run `edgetune run {run.root} --to export` first")
    hashes = {rel: {"sha256": sha256_path(p), "size": size_of(p)} for rel, p in arts.items()}
    fingerprint = sha256_json({"model": base_fp, "adapter": sha256_path(run.adapter_dir) if run.adapter_dir.is_dir() else None,
                               "gguf": {k: v for k, v in hashes.items() if k.endswith(".gguf")},
                               **({"align_adapter": hashes["align_adapter"]["sha256"]} if "align_adapter" in hashes else {})})
    body = {
        "run_dir": str(run.root.resolve()),
        "base_model": {"path": str(base.resolve()), "fingerprint": base_fp},
        "data": {"path": ran.get("data_path", cfg.data.path),
                 "card_sha256": sha256_file(run.data_card) if run.data_card.is_file() else None},
        "method": cfg.train.method,
        "train": to_dict(cfg.train),
        **({"align": to_dict(cfg.align)} if run.aligned else {}),
        "export": to_dict(cfg.export),
        "metrics": run.eval_metrics() if metrics is None else metrics,
        "eval_gates": {"passed": verdict, **({"forced": True} if verdict is False else {})},
        "ollama": {"modelfile": "Modelfile" if "Modelfile" in arts else None,
                   "quant": "source+adapter" if run.adapter_route else run.modelfile_quant},
        "artifacts": hashes,
        "versions": package_versions(),
        "git_commit": git_commit(),
    }
    texts = {}
    if "Modelfile" in arts:
        shipped = run.adapter_gguf if run.adapter_route else run.gguf(run.modelfile_quant)
        text = rebase_modelfile(arts.pop("Modelfile").read_text(encoding="utf-8"), shipped.name, adapter=run.adapter_route)
        texts["Modelfile"] = text
        hashes["Modelfile"] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "size": len(text.encode())}
    return register(run.model_name, body, arts, fingerprint, root=root, texts=texts)
