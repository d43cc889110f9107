"""A GGUF file's tensor infos (name, shape, type) without reading its key/values into objects.

Why by hand: ``gguf.GGUFReader`` builds a numpy view for every element of every metadata array,
which takes seconds for a 50k-token vocabulary (tokens, scores, token types, merges) although
only the tensor infos after them are wanted. The GGUF layout is simple (header; key/values, each
a string key, a type and a value; tensor infos), so this skips the values by their sizes. Type
names and codes come from ``gguf`` (``GGUFValueType``, ``GGMLQuantizationType``).
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
    from gguf import GGMLQuantizationType, GGUFValueType

    fixed = {  # byte sizes of the fixed-size value types
        GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
        GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
        GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
        GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
    }
    p = Path(path)
    with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
            raise EdgetuneError(f"{p} is not a little-endian GGUF file (version 2 or 3).", where=str(p))
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24

        def u32() -> int:
            nonlocal off
            off += 4
            return struct.unpack_from("<I", buf, off - 4)[0]

        def u64() -> int:
            nonlocal off
            off += 8
            return struct.unpack_from("<Q", buf, off - 8)[0]

        def skip_value(vtype: int) -> None:
            nonlocal off
            if vtype in fixed:
                off += fixed[vtype]
            elif vtype == GGUFValueType.STRING:
                n = u64()  # (not `off += u64()`: that would add to the offset read before u64 moved it)
                off += n
            elif vtype == GGUFValueType.ARRAY:
                itype, count = u32(), u64()
                if itype in fixed:
                    off += fixed[itype] * count
                else:
                    for _ in range(count):
                        skip_value(itype)
            else:
                raise EdgetuneError(f"{p}: unknown GGUF value type {vtype} at byte {off}.", where=str(p))

        for _ in range(n_kv):
            key_len = u64()
            off += key_len
            skip_value(u32())
        infos = []
        for _ in range(n_tensors):
            n = u64()
            name = bytes(buf[off:off + n]).decode("utf-8")
            off += n
            shape = tuple(u64() for _ in range(u32()))
            type_name = GGMLQuantizationType(u32()).name.lower()
            off += 8  # data offset
            infos.append(GGUFTensorInfo(name, shape, type_name))
        return infos
