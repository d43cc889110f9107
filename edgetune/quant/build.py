"""What ``edgetune export`` runs: convert a model folder to GGUF, compute an importance matrix when a
type reads one, quantize to a fixed list of types or search the ladder (``--quant auto``), and report
each quantized file's drift against the unquantized export.

The steps live a layer lower: :mod:`edgetune.export` (GGUF conversion and verification),
:mod:`edgetune.quant.quantize` (one llama.cpp quantization) and :mod:`edgetune.quant.autoquant`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgetuneError
from ..qtypes import QTYPES, normalize_qtype
from .quantize import quantize


def quant_drift(f16_gguf, quant_ggufs: dict[str, Path], model_dir=None):
    """Top-1 agreement and mean KL of each quantized GGUF against the f16 export (llama.cpp both)."""
    from ..export.verify import PROMPTS, compare_ggufs
    from ..llamacpp import load_llama

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
    from ..qtypes import AUTO, LADDER

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
    from ..export.imatrix import make_imatrix

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
    from ..export.gguf import convert
    from ..qtypes import AUTO

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
            from ..export.imatrix import calibration_texts

            texts = calibration_texts(heldout, load_tokenizer(model_dir) if Path(heldout).suffix in (".jsonl", ".json") else None)
        res = auto_quantize(base, out_dir, name, imatrix=im_path, ladder=ladder, max_kl=max_kl, min_top1=min_top1, heldout=texts)
        files[res["chosen"]] = res["file"]
        from ..eval.divergence import DriftRow

        best = next(r for r in res["rows"] if r.chosen)
        drift_rows.append(DriftRow(best.qtype, res["positions"], best.top1, best.mean_kl, float("nan")))
    return {"files": files, "verify": convert.last_report if verify else None, "drift": drift_rows, "imatrix": im, "auto": res}
