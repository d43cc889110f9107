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
from .qtypes import QTYPES, normalize_qtype


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


def _quiet(verbose: bool):
    """llama.cpp prints one line per tensor from C; hide it unless asked."""
    import contextlib

    if verbose:
        return contextlib.nullcontext()
    try:
        from llama_cpp._utils import suppress_stdout_stderr

        return suppress_stdout_stderr(disable=False)
    except (ImportError, TypeError):
        return contextlib.nullcontext()


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
    with atomic_path(out) as tmp, _quiet(verbose):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise EdgetuneError(
                f"llama.cpp failed to quantize {src.name} to {q} (code {rc}).",
                where=str(src),
                fix="quantize from an f16/bf16/f32 GGUF written by 'edgetune export gguf'",
            )
    del keep
    return out


def quant_drift(f16_gguf, quant_ggufs: dict[str, Path], model_dir=None):
    """Top-1 agreement and mean KL of each quantized GGUF against the f16 export (llama.cpp both)."""
    from .verify import PROMPTS, compare_ggufs, load_llama

    llm = load_llama(f16_gguf, logits_all=False)
    try:
        lists = [llm.tokenize(p.encode(), add_bos=True, special=True) for p in PROMPTS]
    finally:
        llm.close()
    return compare_ggufs(f16_gguf, quant_ggufs, lists)


def output_name(model_dir: Path) -> str:
    """``<name>`` for ``<name>-<type>.gguf``: the run's name when exporting RUN/fused."""
    model_dir = Path(model_dir).resolve()
    return model_dir.parent.name if model_dir.name in ("fused", "model", "hf") else model_dir.name


def resolve_imatrix(imatrix, quants: list[str], base_dir, model_dir, calib=None, *, show_progress: bool = True) -> dict | None:
    """The importance matrix to quantize with: a file as given; ``"auto"`` computes one from
    ``calib`` into ``base_dir/imatrix.gguf`` (+ imatrix.json) when a requested type reads one
    (``quants`` may hold ``auto``); ``None``/``"off"``: none. Returns the imatrix record or None."""
    from .qtypes import AUTO, LADDER

    if imatrix in (None, "off"):
        return None
    if imatrix != "auto":
        return {"imatrix": str(imatrix), "data": None}
    types = LADDER if AUTO in quants else quants
    if not any(QTYPES[q].imatrix for q in types if q in QTYPES):
        return None
    if calib is None or not Path(calib).is_file():
        needs = [q for q in quants if q in QTYPES and QTYPES[q].needs_imatrix]
        if needs:
            raise EdgetuneError(f"{', '.join(needs)} needs an importance matrix and there is no calibration data.",
                                fix="pass --calib FILE (JSONL rows or text) or --imatrix FILE")
        return None
    from .imatrix import make_imatrix

    return make_imatrix(model_dir, calib, Path(base_dir) / "imatrix.gguf", show_progress=show_progress)


def export_run_kwargs(cfg, run=None, *, heldout=None) -> dict:
    """``export_model`` keywords from an export config: what `edgetune export` and the pipeline's
    export stage both pass, so a recipe field and a flag cannot diverge. A run folder supplies the
    calibration data (its train split) and the held-out texts (its valid split)."""
    calib = cfg.calib or (str(run.split("train")) if run is not None else None)
    if heldout is None and run is not None and run.split("valid").is_file():
        heldout = str(run.split("valid"))
    return {"outtype": cfg.outtype, "imatrix": cfg.imatrix, "calib": calib, "heldout": heldout, "max_kl": cfg.max_kl,
            "min_top1": cfg.min_top1, "ladder": cfg.ladder, "verify": cfg.verify}


def export_model(
    model_dir,
    out_dir=None,
    quants: list[str] | None = None,
    *,
    outtype: str = "f16",
    imatrix=None,
    calib=None,
    heldout=None,
    max_kl: float = 0.03,
    min_top1: float = 0.90,
    ladder: list[str] | None = None,
    verify: bool = True,
    name: str | None = None,
    show_progress: bool = True,
) -> dict:
    """One shot: convert ``model_dir`` to ``<name>-<outtype>.gguf`` then quantize to each of ``quants``.

    ``imatrix``: a file, ``"auto"`` (computed from ``calib`` when a type benefits, see
    :func:`resolve_imatrix`) or None. ``quants == ["auto"]``: quantize ``ladder``, measure each on
    ``heldout`` texts (a JSONL/text file) and keep the smallest passing ``max_kl``/``min_top1``
    (export/autoquant.py). Returns ``{"files": {type: path}, "verify": VerifyReport | None,
    "drift": [DriftRow], "imatrix": record | None, "auto": result | None}``; the drift rows compare
    each quantized file with the unquantized export.
    """
    from .gguf import convert
    from .qtypes import AUTO

    model_dir = Path(model_dir)
    auto = [q.strip().lower() for q in (quants or [])] == [AUTO]
    qs = [] if auto else [normalize_qtype(q) for q in (quants or [])]
    name = name or output_name(model_dir)
    out_dir = Path(out_dir) if out_dir else model_dir.parent / "gguf"
    base = out_dir / f"{name}-{outtype}.gguf"
    im = resolve_imatrix(imatrix, [AUTO] if auto else qs, out_dir, model_dir, calib, show_progress=show_progress)
    im_path = im["imatrix"] if im else None
    convert(model_dir, base, outtype, verify=verify, show_progress=show_progress)
    files = {outtype: base}
    for q in qs:
        if q == outtype:
            continue
        files[q] = quantize(base, out_dir / f"{name}-{q}.gguf", q, imatrix=im_path if QTYPES[q].imatrix else None)
    drift_rows = []
    quantized = {q: p for q, p in files.items() if q != outtype}
    if verify and quantized:
        drift_rows = quant_drift(base, quantized)
    res = None
    if auto:
        from .autoquant import auto_quantize

        texts = None
        if heldout and Path(heldout).is_file():
            from ..data.template import load_tokenizer
            from .imatrix import calibration_texts

            texts = calibration_texts(heldout, load_tokenizer(model_dir) if Path(heldout).suffix in (".jsonl", ".json") else None)
        res = auto_quantize(base, out_dir, name, imatrix=im_path, ladder=ladder, max_kl=max_kl, min_top1=min_top1, heldout=texts)
        files[res["chosen"]] = res["file"]
        from .verify import DriftRow

        best = next(r for r in res["rows"] if r.chosen)
        drift_rows.append(DriftRow(best.qtype, res["positions"], best.top1, best.mean_kl, float("nan")))
    return {"files": files, "verify": convert.last_report if verify else None, "drift": drift_rows, "imatrix": im, "auto": res}
