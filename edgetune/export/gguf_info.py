"""A GGUF file's tensor infos (name, shape, type) and chosen metadata values, read fast.

Why by hand: ``gguf.GGUFReader`` builds a numpy view for every element of every metadata array,
which takes seconds for a 50k-token vocabulary (tokens, scores, token types, merges) although
only the tensor infos after them or a few keys are wanted. The GGUF layout is simple (header;
key/values, each a string key, a type and a value; tensor infos), so this decodes the wanted
values and skips the others by their sizes. Type names and codes come from ``gguf``
(``GGUFValueType``, ``GGMLQuantizationType``).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgetuneError


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first (as GGUFReader's ``shape``)
    type_name: str  # lower-case GGML type: "f16", "q8_0", "q4_k", ...

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_tensor_infos(path: str | Path) -> list[GGUFTensorInfo]:
    """Tensor infos of a little-endian GGUF (version 2 or 3: what llama.cpp and gguf-py write)."""
    return read_header(path)[1]


def read_metadata(path: str | Path, keys) -> dict:
    """The values of ``keys`` that the GGUF has (strings as str, arrays as lists); others are skipped."""
    return read_header(path, keys)[0]


def read_header(path: str | Path, keys=()) -> tuple[dict, list[GGUFTensorInfo]]:
    """(values of the wanted metadata ``keys``, tensor infos); the other values are skipped by size."""
    from gguf import GGMLQuantizationType, GGUFValueType

    fixed = {  # struct format of the fixed-size value types
        GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.BOOL: "<?",
        GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
        GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
        GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
    }
    wanted = set(keys)
    p = Path(path)
    with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
            raise EdgetuneError(f"{p} is not a little-endian GGUF file (version 2 or 3).", where=str(p))
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24

        def take(fmt: str):
            nonlocal off
            (v,) = struct.unpack_from(fmt, buf, off)
            off += struct.calcsize(fmt)
            return v

        def string(decode: bool) -> str | None:
            nonlocal off
            n = take("<Q")
            off += n
            return bytes(buf[off - n:off]).decode("utf-8", "replace") if decode else None

        def value(vtype: int, decode: bool):
            nonlocal off
            if vtype in fixed:
                if decode:
                    return take(fixed[vtype])
                off += struct.calcsize(fixed[vtype])
            elif vtype == GGUFValueType.STRING:
                return string(decode)
            elif vtype == GGUFValueType.ARRAY:
                itype, count = take("<I"), take("<Q")
                if itype in fixed and not decode:
                    off += struct.calcsize(fixed[itype]) * count
                else:
                    items = [value(itype, decode) for _ in range(count)]
                    return items if decode else None
            else:
                raise EdgetuneError(f"{p}: unknown GGUF value type {vtype} at byte {off}.", where=str(p))
            return None

        meta = {}
        for _ in range(n_kv):
            key = string(True)
            v = value(take("<I"), key in wanted)
            if key in wanted:
                meta[key] = v
        infos = []
        for _ in range(n_tensors):
            name = string(True)
            shape = tuple(take("<Q") for _ in range(take("<I")))
            type_name = GGMLQuantizationType(take("<I")).name.lower()
            off += 8  # data offset
            infos.append(GGUFTensorInfo(name, shape, type_name))
        return meta, infos
