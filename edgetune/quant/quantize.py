"""Quantize a GGUF through llama.cpp (``llama_model_quantize`` in llama-cpp-python).

Quantization itself is llama.cpp's (k-quants, i-quants, mixed per-tensor types of q4_k_m…); this
module only picks the ftype, passes an importance matrix when one is given, writes atomically and
reports the drift of the result against its unquantized source.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..errors import EdgetuneError, MissingDependencyError
from ..io import atomic_path
from ..llamacpp import quiet
from ..qtypes import QTYPES, normalize_qtype


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """Read an importance matrix: llama-imatrix's GGUF format or its legacy ``.dat`` format.

    GGUF: tensors ``<name>.in_sum2`` (sum of squared activations) and ``<name>.counts``; the
    importance is in_sum2 / counts. Legacy: int32 count, then per entry int32 name length, name,
    int32 ncall, int32 nval, float32[nval] (already divided by ncall by llama-imatrix).
    """
    p = Path(path)
    if not p.exists():
        raise EdgetuneError(f"Importance matrix not found: {p}", where=str(p))
    with open(p, "rb") as fh:
        magic = fh.read(4)
    out: dict[str, np.ndarray] = {}
    if magic == b"GGUF":
        from gguf import GGUFReader

        r = GGUFReader(str(p))
        t = {x.name: np.asarray(x.data, dtype=np.float32) for x in r.tensors}
        for name, s2 in t.items():
            if name.endswith(".in_sum2"):
                base = name[: -len(".in_sum2")]
                counts = t.get(base + ".counts")
                c = float(counts.reshape(-1)[0]) if counts is not None and counts.size else 1.0
                out[base] = (s2.reshape(-1) / max(c, 1.0)).astype(np.float32)
        return out
    try:
        with open(p, "rb") as fh:
            (n,) = np.frombuffer(fh.read(4), dtype="<i4")
            for _ in range(int(n)):
                (ln,) = np.frombuffer(fh.read(4), dtype="<i4")
                name = fh.read(int(ln)).decode("utf-8")
                _ncall, nval = np.frombuffer(fh.read(8), dtype="<i4")
                out[name] = np.frombuffer(fh.read(4 * int(nval)), dtype="<f4").copy()
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgetuneError(f"Not an importance matrix file ({exc}).", where=str(p), fix="create it with llama-imatrix") from None
    return out


def quantize(in_gguf, out_gguf, qtype: str, imatrix=None, *, nthread: int | None = None, verbose: bool = False,
             require_imatrix: bool = True) -> Path:
    """Quantize ``in_gguf`` (f32/f16/bf16 GGUF) to ``out_gguf`` with llama.cpp; returns the path.

    ``require_imatrix=False`` lets a benchmark measure a needs-imatrix type without one (llama.cpp
    itself refuses only its 1- and 2-bit i-quants)."""
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError("llama-cpp-python", "llama", "Quantizing a GGUF") from None
    q = normalize_qtype(qtype)
    src = Path(in_gguf)
    if not src.exists():
        raise EdgetuneError(f"GGUF not found: {src}", where=str(src))
    if QTYPES[q].needs_imatrix and imatrix is None and require_imatrix:
        raise EdgetuneError(f"{q} needs an importance matrix.", fix="pass --imatrix FILE (made with llama-imatrix)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + QTYPES[q].ftype)
    params.nthread = nthread or min(4, os.cpu_count() or 1)
    keep = []  # ctypes buffers must outlive the call
    if imatrix is not None:
        data = load_imatrix(imatrix)
        if not data:
            raise EdgetuneError("The importance matrix has no entries.", where=str(imatrix))
        arr = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()  # NULL-name terminated
        for i, (name, values) in enumerate(data.items()):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(buf)
            arr[i].name = name.encode()
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(data)].name = None
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    out = Path(out_gguf)
    from ..hardware import require_free_disk

    # the source is f16/bf16 (2 bytes a weight; an f32 source only makes this figure larger)
    require_free_disk(out, src.stat().st_size / 2 * QTYPES[q].bits / 8, f"the {q} GGUF",
                      "free space there, or quantize into another folder")
    with atomic_path(out) as tmp, quiet(verbose):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise EdgetuneError(
                f"llama.cpp failed to quantize {src.name} to {q} (code {rc}).",
                where=str(src),
                fix="quantize from an f16/bf16/f32 GGUF written by 'edgetune export gguf'",
            )
    del keep
    return out
