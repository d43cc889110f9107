"""Registry aliases: named pointers (``prod``, ``canary``…) to a model's versions, with their history.

``<home>/<name>/aliases.yaml`` holds, per alias, the version it points at now and every change
(version, time, action, reason)::

    prod:
      version: 3
      history:
      - {version: 1, at: '2026-12-06T17:00:00+00:00', action: promote, reason: first release}
      - {version: 3, at: '2026-12-06T18:10:00+00:00', action: promote, reason: 'canary: 0.71 vs 0.52 …'}

Versions stay immutable (:mod:`edgetune.registry`); an alias is the one mutable thing, written whole
to a temp file and renamed over the old one under a lock, so a reader (the team server) never sees
half a file. ``promote`` refuses a version whose eval gates failed unless forced; ``rollback`` moves
the alias back to the version it pointed at before the current one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import tempfile
from pathlib import Path

import yaml

from .errors import EdgetuneError
from .paths import home
from .qtypes import QTYPES
from .registry import Entry, check_name, get

ALIASES = "aliases.yaml"
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def check_alias(alias: str) -> str:
    if not _ALIAS_RE.match(alias or ""):
        raise EdgetuneError(f"'{alias}' is not a valid alias.", fix="lower-case letters, digits, '_' or '-', e.g. prod, canary")
    return alias


def _path(name: str, root: Path | None) -> Path:
    return (Path(root) if root else home()) / check_name(name) / ALIASES


def read(name: str, root: Path | None = None) -> dict[str, dict]:
    """Every alias of ``name``: ``{alias: {"version": N, "history": [...]}}`` (empty when none)."""
    p = _path(name, root)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return {}
    except yaml.YAMLError as exc:
        raise EdgetuneError(f"The alias file is not valid YAML ({exc}).", where=str(p), fix="restore it or remove the broken alias") from None
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(name: str, root: Path | None):
    import fcntl

    p = _path(name, root)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.with_name(".aliases.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield p
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write(p: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".aliases.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(data, fh, sort_keys=False, allow_unicode=True)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _set(name: str, alias: str, version: int, action: str, reason: str | None, root: Path | None) -> dict:
    with _locked(name, root) as p:
        data = read(name, root)
        cur = data.get(alias) or {"version": None, "history": []}
        cur["history"] = list(cur.get("history") or []) + [
            {"version": version, "at": _now(), "action": action, **({"reason": reason} if reason else {})}]
        cur["version"] = version
        data[alias] = cur
        _write(p, data)
        return cur


def promote(ref: str, alias: str, *, root: Path | None = None, force: bool = False, reason: str | None = None) -> Entry:
    """Point ``alias`` at the version ``ref`` names (``name:vN``; ``name`` alone: its newest)."""
    check_alias(alias)
    entry = get(ref, root)
    gates = (entry.manifest.get("eval_gates") or {}).get("passed")
    if gates is False and not force:
        raise EdgetuneError(f"{entry.ref} failed its eval gates; it is not promoted to '{alias}'.",
                            where=str(entry.path / "manifest.yaml"),
                            fix=f"promote a version that passed, or `edgetune models promote {entry.ref} --as {alias} --force`")
    _set(entry.name, alias, entry.version, "promote", reason, root)
    return entry


def rollback(name: str, alias: str, *, root: Path | None = None, reason: str | None = None) -> Entry:
    """Move ``alias`` back to the version it pointed at before its current one."""
    check_alias(alias)
    cur = read(name, root).get(alias)
    if not cur or cur.get("version") is None:
        raise EdgetuneError(f"'{name}' has no alias '{alias}'.", fix=f"edgetune models promote {name}:vN --as {alias}")
    now = cur["version"]
    prev = None  # the holder before the current one: the history walked back past the current version
    for h in reversed(cur.get("history") or []):
        if h.get("version") != now:
            prev = h["version"]
            break
    if prev is None:
        raise EdgetuneError(f"'{name}@{alias}' has pointed at v{now} only; there is nothing to roll back to.",
                            fix=f"promote another version: edgetune models promote {name}:vN --as {alias}")
    entry = get(f"{name}:v{prev}", root)
    _set(name, alias, prev, "rollback", reason or f"from v{now}", root)
    return entry


def resolve(name: str, alias: str, root: Path | None = None) -> Entry:
    cur = read(name, root).get(check_alias(alias))
    if not cur or cur.get("version") is None:
        raise EdgetuneError(f"'{name}' has no alias '{alias}'.", fix=f"edgetune models promote {name}:vN --as {alias}")
    return get(f"{name}:v{cur['version']}", root)


def resolve_ref(ref: str, root: Path | None = None) -> Entry:
    """``name@alias``, ``name:vN`` or ``name`` (newest) → the entry."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return resolve(name, alias, root)
    return get(ref, root)


def aliases_of(name: str, version: int, root: Path | None = None) -> list[str]:
    return sorted(a for a, v in read(name, root).items() if (v or {}).get("version") == version)


def serving_gguf(entry: Entry) -> Path:
    """The GGUF a registry entry serves: the one its Modelfile ships, else its first quantized GGUF."""
    arts = entry.manifest.get("artifacts") or {}
    ggufs = sorted(k for k in arts if k.endswith(".gguf") and (entry.path / k).is_file())
    quant = ((entry.manifest.get("ollama") or {}).get("quant") or "").lower()
    pick = next((g for g in ggufs if quant and g.lower().endswith(f"-{quant}.gguf")), None)
    unquantized = tuple(f"-{q.name}.gguf" for q in QTYPES.values() if q.bits >= 16)  # f32, f16, bf16
    pick = pick or next((g for g in ggufs if not g.lower().endswith(unquantized)), None)
    pick = pick or (ggufs[0] if ggufs else None)
    if pick is None:
        raise EdgetuneError(f"{entry.ref} holds no GGUF to serve.", where=str(entry.path))
    return entry.path / pick
