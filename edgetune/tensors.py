"""Stream safetensors tensors one at a time, with numpy only (no torch).

Why by hand: ``safetensors.numpy`` cannot read or write bfloat16 (numpy has no such dtype), and
the models we fuse and convert are stored in bf16. The safetensors format is simple (an 8-byte
little-endian header length, a JSON header of ``name -> dtype, shape, data_offsets``, then raw
bytes), so reading one tensor at a time with ``seek`` + ``fromfile`` keeps peak memory at the
size of the largest tensor instead of the model. bf16 tensors are handed out as ``uint16`` arrays
(the raw bits) together with their dtype name; :func:`to_float32` widens them exactly.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgetuneError

# safetensors dtype name -> numpy storage dtype (bf16 is stored as its raw uint16 bits)
ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgetuneError(
            f"Cannot read safetensors file {path.name}: {exc}",
            where=str(path),
            fix="re-save the model with save_pretrained(safe_serialization=True)",
        ) from None
    return header, 8 + n


class SafetensorsReader:
    """All tensors of an HF folder (single file or sharded with an index), read lazily."""

    def __init__(self, folder_or_file: str | Path):
        p = Path(folder_or_file)
        if p.is_file():
            files = [p]
        else:
            index = p / "model.safetensors.index.json"
            if index.exists():
                wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted({p / f for f in wm.values()})
            else:
                files = sorted(p.glob("*.safetensors"))
        if not files:
            raise EdgetuneError(
                f"No .safetensors weights in {p}.",
                where=str(p),
                fix="save the model with save_pretrained (safetensors); .bin/.pt checkpoints are not read",
            )
        self.files = files
        self.refs: dict[str, TensorRef] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            header, base = _read_header(f)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                if info["dtype"] not in ST_DTYPES:
                    raise EdgetuneError(f"Unsupported tensor dtype {info['dtype']} for {name}.", where=str(f))
                a, b = info["data_offsets"]
                self.refs[name] = TensorRef(name, f, info["dtype"], tuple(info["shape"]), base + a, b - a)

    def __contains__(self, name: str) -> bool:
        return name in self.refs

    def names(self) -> list[str]:
        return list(self.refs)

    def load(self, name: str) -> np.ndarray:
        """The tensor in its storage dtype (bf16 as uint16 bits); one tensor in memory."""
        ref = self.refs[name]
        dt = ST_DTYPES[ref.dtype]
        with open(ref.file, "rb") as fh:
            fh.seek(ref.start)
            arr = np.fromfile(fh, dtype=dt, count=ref.numel)
        return arr.reshape(ref.shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a tensor (first axis) in its storage dtype; only those are read."""
        ref = self.refs[name]
        dt = ST_DTYPES[ref.dtype]
        row = ref.numel // ref.shape[0] if ref.shape and ref.shape[0] else 0
        with open(ref.file, "rb") as fh:
            fh.seek(ref.start + start * row * dt.itemsize)
            arr = np.fromfile(fh, dtype=dt, count=(stop - start) * row)
        return arr.reshape((stop - start, *ref.shape[1:]))

    def take(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of a tensor (an embedding lookup) through a read-only memory map: the
        pages read are page cache, not the process's own memory."""
        ref = self.refs[name]
        mm = np.memmap(ref.file, dtype=ST_DTYPES[ref.dtype], mode="r", offset=ref.start, shape=ref.shape)
        try:
            return np.array(mm[np.asarray(index)])
        finally:
            del mm

    def load_f32(self, name: str) -> np.ndarray:
        return to_float32(self.load(name), self.refs[name].dtype)

    def largest_nbytes(self) -> int:
        return max(r.nbytes for r in self.refs.values())


def to_float32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def f32_to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits with round-to-nearest-even (what torch does), NaN kept NaN."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    u = a.view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def from_float32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """float32 -> the storage dtype of ``st_dtype`` (bf16 as uint16 bits)."""
    if st_dtype == "BF16":
        return f32_to_bf16_bits(arr)
    return arr.astype(ST_DTYPES[st_dtype])


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header is planned first, data streamed after.

    ``plan`` lists ``(name, st_dtype, shape)`` in write order; then call :meth:`write` once per
    tensor in that order. Peak memory is one tensor.
    """

    def __init__(self, path: str | Path, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._expect: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, dt, shape in plan:
            n = int(np.prod(shape, dtype=np.int64)) * ST_DTYPES[dt].itemsize
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._expect.append((name, dt, tuple(shape), n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes like safetensors does
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._i = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        exp_name, dt, shape, n = self._expect[self._i]
        if name != exp_name or tuple(arr.shape) != shape or arr.dtype != ST_DTYPES[dt]:
            raise ValueError(f"safetensors write order/shape mismatch: got {name} {arr.shape} {arr.dtype}, expected {exp_name} {shape} {dt}")
        np.ascontiguousarray(arr).tofile(self._fh)
        self._i += 1

    def close(self) -> None:
        if self._i != len(self._expect):
            self._fh.close()
            raise ValueError(f"safetensors writer closed after {self._i} of {len(self._expect)} tensors")
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def iter_tensors(reader: SafetensorsReader) -> Iterator[tuple[str, np.ndarray]]:
    for name in reader.names():
        yield name, reader.load(name)


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
