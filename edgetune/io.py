"""Atomic file and folder writes, hashing, JSON/JSONL helpers.

Every artifact edgetune produces goes through :func:`atomic_path` or :func:`atomic_dir`, so a
crash, a full disk or Ctrl-C never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import EdgetuneError


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back).

    mkstemp/mkdtemp create 0600/0700 entries; a finished artifact gets the mode any other tool
    would give it (0644/0755 under the usual umask), so e.g. a llama-server or Ollama running as
    another user can read a GGUF we wrote.
    """
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(path: Path, exc: OSError) -> EdgetuneError:
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    return EdgetuneError(
        f"No space left while writing {path.name} ({free / 1e9:.2f} GB free).",
        where=str(path),
        fix="free some disk space or choose another output folder (-o); nothing was left under the final name",
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".part", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise _disk_full(final, exc) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; it replaces ``path`` only on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise _disk_full(final, exc) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EdgetuneError(f"File not found: {p}", where=str(p)) from exc
    except json.JSONDecodeError as exc:
        raise EdgetuneError(
            f"Invalid JSON: {exc.msg}", where=f"{p}:{exc.lineno}:{exc.colno}", fix="fix the JSON syntax"
        ) from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike) -> str:
    """Hash of every file's relative path and content under ``path`` (sorted, hidden files skipped)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(root)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """:func:`sha256_dir` for a folder, :func:`sha256_file` for a file."""
    return sha256_dir(path) if Path(path).is_dir() else sha256_file(path)


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able value (keys sorted; non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def size_of(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
