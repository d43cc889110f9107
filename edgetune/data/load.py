"""Reading raw rows from files, folders and ``save_to_disk`` datasets.

CSV, Parquet and ``save_to_disk`` folders go through the ``datasets`` library. JSON Lines and JSON
arrays are read here, line by line, on purpose: ``datasets``' JSON builder stops the whole load at the
first bad line with a pyarrow traceback, while a user needs *every* bad line reported as
``file:line`` (bad JSON, BOMs, non-UTF-8 bytes, huge lines) and the good lines kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgetuneError
from .problems import Problem

JSONL_EXT = (".jsonl", ".ndjson")
JSON_EXT = (".json",)
TABLE_EXT = (".csv", ".tsv", ".parquet", ".arrow")
SUPPORTED = JSONL_EXT + JSON_EXT + TABLE_EXT
MAX_LINE_BYTES = 8 << 20  # a single record above 8 MiB is a broken export, not a training example
BOM = b"\xef\xbb\xbf"
# Columns that CSV/TSV exports usually hold as JSON text.
JSON_COLUMNS = ("messages", "conversations", "chosen", "rejected", "prompt", "tools")


class RawLine(str):
    """A JSONL line kept as text (about a third of the parsed dict's memory); parsed again only
    if the record ends up in rejects.jsonl."""


@dataclass
class RawItem:
    source: str
    line: int  # 1-based line (JSONL/JSON/CSV) or row number (Parquet/Arrow)
    obj: Any = None
    problem: Problem | None = None
    raw: str | None = None  # the undecodable/unparseable text (shortened) for rejects.jsonl
    line_text: RawLine | None = None  # JSONL: the line itself (what rejects.jsonl shows)
    nbytes: int = 0  # JSONL: bytes consumed (drives the reading progress bar)


def _unreadable(msg: str, where: str, fix: str) -> EdgetuneError:
    return EdgetuneError(msg, where=where, fix=fix, exit_code=2)


def is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists())


def is_hub_id(path: str | Path) -> bool:
    """``owner/name`` that is not a local path: a Hugging Face Hub dataset id."""
    s = str(path)
    return not Path(s).expanduser().exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) is not None


def iter_hub(repo_id: str) -> Iterator[RawItem]:
    """Rows of a Hub dataset (all splits, sorted). Only when the user passes an id and has network."""
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(repo_id)
    except Exception as exc:  # offline, unknown id, auth: all mean "cannot read this input"
        raise _unreadable(
            f"{repo_id!r} is not a local path, and loading it as a Hub dataset failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            repo_id, "check the id and your network (HF_HUB_OFFLINE=1 blocks the Hub), or pass a local path",
        ) from None
    for split in sorted(loaded):
        yield from _rows_from_dataset(loaded[split], f"hub:{repo_id}[{split}]", 1)


def list_sources(path: str | Path) -> list[Path]:
    """The files (or saved-dataset folders) under ``path``, sorted for determinism."""
    p = Path(path).expanduser()
    if not p.exists():
        raise _unreadable(f"Data not found: {p}", str(p), "check the path (a file, a folder of files, or a save_to_disk folder)")
    if p.is_file():
        if p.suffix.lower() not in SUPPORTED:
            raise _unreadable(
                f"Unsupported data file type '{p.suffix}'.", str(p), f"use one of: {', '.join(SUPPORTED)}"
            )
        return [p]
    if is_saved_dataset(p):
        return [p]
    found = sorted(
        f for f in p.rglob("*")
        if f.is_file() and f.suffix.lower() in SUPPORTED and not any(part.startswith(".") for part in f.relative_to(p).parts)
        and f.name not in ("dataset_info.json", "state.json", "dataset_dict.json", "data_card.json")
        and f.name != "rejects.jsonl"
    )
    saved = sorted(d for d in p.iterdir() if is_saved_dataset(d))
    found = [f for f in found if not any(d in f.parents for d in saved)] + saved
    if not found:
        raise _unreadable(f"No data files in {p}.", str(p), f"put {', '.join(SUPPORTED)} files in the folder")
    return sorted(found)


def _shorten(s: str, n: int = 500) -> str:
    return s if len(s) <= n else s[:n] + f"… [{len(s) - n} more chars]"


def _decode(b: bytes) -> str:
    return b.decode("utf-8")


def _json_problem(exc: json.JSONDecodeError, col_offset: int = 0) -> Problem:
    return Problem("bad_json", f"invalid JSON: {exc.msg} (column {exc.colno + col_offset})")


def iter_jsonl(path: Path) -> Iterator[RawItem]:
    src = str(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            yield RawItem(src, 1, problem=Problem("bad_encoding", "file is UTF-16 encoded, not UTF-8"))
            return
        lineno = 0
        while True:
            line = fh.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            lineno += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                size = len(line)
                while True:  # skip the rest of the huge line without holding it
                    more = fh.readline(MAX_LINE_BYTES)
                    size += len(more)
                    if not more or more.endswith(b"\n"):
                        size -= 1 if more.endswith(b"\n") else 0
                        break
                yield RawItem(src, lineno, problem=Problem("line_too_long", f"line is {size:,} bytes (limit {MAX_LINE_BYTES:,})"))
                continue
            if line.startswith(BOM):
                line = line[len(BOM):]
            if not line.strip():
                continue
            try:
                text = _decode(line)
            except UnicodeDecodeError as exc:
                yield RawItem(
                    src, lineno, problem=Problem("bad_encoding", f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start})"),
                    raw=_shorten(line.decode("utf-8", errors="replace")),
                )
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawItem(src, lineno, problem=_json_problem(exc), raw=_shorten(text.rstrip("\n")))
                continue
            except RecursionError:
                yield RawItem(src, lineno, problem=Problem("bad_json", "JSON nested too deeply"), raw=_shorten(text))
                continue
            yield RawItem(src, lineno, obj=obj, line_text=RawLine(text.strip()), nbytes=len(line))


def iter_json(path: Path) -> Iterator[RawItem]:
    """A JSON array (each element with its line number), or JSON Lines saved as ``.json``."""
    src = str(path)
    data = path.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        text = _decode(data)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        # maybe JSON Lines with one bad line: let the line reader localise it
        if data.lstrip()[:1] != b"[":
            yield from iter_jsonl(path)
            return
        yield RawItem(src, line, problem=Problem("bad_encoding", f"not valid UTF-8 (byte 0x{data[exc.start]:02x})"))
        return
    stripped = text.lstrip()
    if not stripped.startswith("["):
        if stripped.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                yield from iter_jsonl(path)  # JSON Lines with a .json name
                return
            rows = None
            if isinstance(obj, dict):
                rows = next((obj[k] for k in ("data", "rows", "examples", "train") if isinstance(obj.get(k), list)), None)
            if rows is None:
                yield RawItem(src, 1, obj=obj)
            else:
                for i, r in enumerate(rows):
                    yield RawItem(src, i + 1, obj=r)
            return
        if not stripped:
            return
        yield RawItem(src, 1, problem=Problem("bad_json", "file is neither a JSON array nor JSON objects"), raw=_shorten(text))
        return
    # Walk the array element by element so each element keeps its line number.
    dec = json.JSONDecoder()
    i = len(text) - len(stripped) + 1
    n = len(text)
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    while True:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            yield RawItem(src, line_at(n), problem=Problem("bad_json", "unterminated JSON array (missing ']')"))
            return
        if text[i] == "]":
            return
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            yield RawItem(src, line_at(exc.pos), problem=Problem("bad_json", f"invalid JSON: {exc.msg}"), raw=_shorten(text[i:i + 500]))
            return  # the rest of an array cannot be re-synchronised reliably
        except RecursionError:
            yield RawItem(src, line_at(i), problem=Problem("bad_json", "JSON nested too deeply"))
            return
        yield RawItem(src, line_at(i), obj=obj)
        i = end
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] != "]":
            yield RawItem(src, line_at(i), problem=Problem("bad_json", f"expected ',' or ']' but found {text[i]!r}"))
            return


def _maybe_json(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in ("[", "{"):
        try:
            return json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            return v
    return v


def _rows_from_dataset(ds, src: str, first_line: int) -> Iterator[RawItem]:
    for i, row in enumerate(ds):
        obj = {k: (_maybe_json(v) if k in JSON_COLUMNS else v) for k, v in row.items()}
        yield RawItem(src, i + first_line, obj=obj)


def iter_table(path: Path) -> Iterator[RawItem]:
    import datasets

    datasets.disable_progress_bars()
    src = str(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            kw = {"sep": "\t"} if suffix == ".tsv" else {}
            ds = datasets.Dataset.from_csv(src, keep_in_memory=True, **kw)
            first = 2  # row 1 is the header
        elif suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(src, keep_in_memory=True)
            first = 1
        else:
            ds = datasets.Dataset.from_file(src, in_memory=True)
            first = 1
    except Exception as exc:  # pyarrow/pandas raise a zoo of types; all mean "unreadable"
        raise _unreadable(
            f"Could not read {path.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            src, "check that the file is a valid, UTF-8 table (re-export it)",
        ) from None
    yield from _rows_from_dataset(ds, src, first)


def iter_saved(path: Path) -> Iterator[RawItem]:
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise _unreadable(
            f"Could not load the saved dataset {path}: {exc}", str(path), "the folder must come from Dataset.save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        for split in sorted(loaded):
            yield from _rows_from_dataset(loaded[split], f"{path}[{split}]", 1)
    else:
        yield from _rows_from_dataset(loaded, str(path), 1)


def iter_source(path: Path) -> Iterator[RawItem]:
    if path.is_dir():
        yield from iter_saved(path)
        return
    suffix = path.suffix.lower()
    try:
        if suffix in JSONL_EXT:
            yield from iter_jsonl(path)
        elif suffix in JSON_EXT:
            yield from iter_json(path)
        else:
            yield from iter_table(path)
    except OSError as exc:
        raise _unreadable(f"Could not read {path}: {exc.strerror or exc}", str(path), "check permissions") from None
