"""GGUF weight types: one row per type name, read by the converter, the quantizer, the config, the
CLI and the disk estimate of ``edgetune plan``.

``ftype`` is the llama.cpp file type without its prefix: ``LLAMA_FTYPE_<ftype>`` in llama.h
(``llama_cpp`` constants) and ``gguf.LlamaFileType.<ftype>`` (written as ``general.file_type``).
``bits`` is the approximate bits per weight from llama.cpp's quantize table
(tools/quantize/quantize.cpp); it is used for disk estimates only. ``convert``: our HF -> GGUF
converter writes this type directly (export/gguf.py); ``quantize``: llama.cpp's
``llama_model_quantize`` produces it from an f32/f16/bf16 GGUF (quant/quantize.py).
``ladder``: tried by ``export --quant auto`` (quant/autoquant.py), which ships the smallest type
that passes the quality gate. ``imatrix``: llama.cpp's quantizer reads an importance matrix for
this type (every k-/i-quant and legacy 4/5-bit type; q8_0 and float types ignore it), so
``export.imatrix: auto`` computes one (export/imatrix.py) when a requested type has this flag.
``ggml``, ``verify_tolerance``/``near_tie`` and ``adapter``: how the converter writes a ``convert``
type, how strictly its export is checked and whether an adapter GGUF may hold it.
Adding a type llama.cpp knows is one row. This module imports nothing heavy (the config and the
CLI read it).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EdgetuneError


@dataclass(frozen=True)
class QType:
    name: str  # user-facing name (lower case, as in file names: <name>-<type>.gguf)
    ftype: str  # llama.cpp LLAMA_FTYPE_* / gguf.LlamaFileType member name
    bits: float  # approximate bits per weight (disk estimates)
    convert: bool = False  # written directly by export/gguf.py
    quantize: bool = True  # produced by llama.cpp's quantizer
    # edgetune refuses these without an importance matrix (llama-quantize itself refuses only its
    # 1- and 2-bit i-quants and q2_k_s); scripts/bench_imatrix.py measures iq3_m both ways
    needs_imatrix: bool = False
    ladder: bool = False  # one of the types `--quant auto` measures
    imatrix: bool = True  # llama.cpp's quantizer uses an importance matrix for it
    # convert: the gguf.GGMLQuantizationType member the converter writes 2-D weights as (norms and
    # biases stay F32; q8_0 falls back to F16 for a row length not a multiple of its 32-value block)
    ggml: str | None = None
    # the HF-vs-GGUF check of a conversion (export/verify.py): max |Δlogit| allowed and how close the
    # HF top-2 may be for a top-1 flip to count as a near-tie, as fractions of the reference logits'
    # standard deviation (a tiny random model and a real one get the same strictness); None: the
    # type is reported, not gated. bf16 rounds weights to 8 mantissa bits, f16 to 11
    verify_tolerance: float | None = None
    near_tie: float = 0.0
    adapter: bool = False  # a LoRA adapter GGUF may hold this type (export/adapter.py)


QTYPES: dict[str, QType] = {
    q.name: q
    for q in [
        QType("f32", "ALL_F32", 32.0, convert=True, quantize=False, imatrix=False, ggml="F32",
              verify_tolerance=0.005, near_tie=0.002, adapter=True),
        QType("f16", "MOSTLY_F16", 16.0, convert=True, imatrix=False, ggml="F16", verify_tolerance=0.1, near_tie=0.05,
              adapter=True),
        QType("bf16", "MOSTLY_BF16", 16.0, convert=True, imatrix=False, ggml="BF16", verify_tolerance=0.25, near_tie=0.1),
        QType("q8_0", "MOSTLY_Q8_0", 8.5, convert=True, ladder=True, imatrix=False, ggml="Q8_0"),
        QType("q6_k", "MOSTLY_Q6_K", 6.56, ladder=True),
        QType("q5_k_m", "MOSTLY_Q5_K_M", 5.69, ladder=True),
        QType("q5_k_s", "MOSTLY_Q5_K_S", 5.54),
        QType("q5_1", "MOSTLY_Q5_1", 6.0),
        QType("q5_0", "MOSTLY_Q5_0", 5.54),
        QType("q4_k_m", "MOSTLY_Q4_K_M", 4.89, ladder=True),
        QType("q4_k_s", "MOSTLY_Q4_K_S", 4.58),
        QType("q4_1", "MOSTLY_Q4_1", 5.0),
        QType("q4_0", "MOSTLY_Q4_0", 4.55),
        QType("iq4_nl", "MOSTLY_IQ4_NL", 4.5),
        QType("iq4_xs", "MOSTLY_IQ4_XS", 4.25, ladder=True),
        QType("q3_k_l", "MOSTLY_Q3_K_L", 4.27),
        QType("q3_k_m", "MOSTLY_Q3_K_M", 3.91, ladder=True),
        QType("q3_k_s", "MOSTLY_Q3_K_S", 3.5),
        QType("iq3_m", "MOSTLY_IQ3_M", 3.66, needs_imatrix=True, ladder=True),
        QType("q2_k", "MOSTLY_Q2_K", 3.0),
        QType("iq2_m", "MOSTLY_IQ2_M", 2.7, needs_imatrix=True, ladder=True),
    ]
}
OUTTYPES = tuple(q.name for q in QTYPES.values() if q.convert)  # choices of export.outtype / --type
QUANTS = tuple(q.name for q in QTYPES.values() if q.quantize)  # choices of export.quants / --quant
AUTO = "auto"  # export.quants: [auto] / --quant auto: measure LADDER, ship the smallest that passes the gate
LADDER = tuple(q.name for q in QTYPES.values() if q.ladder)  # largest first, as in the table
ADAPTER_OUTTYPES = tuple(q.name for q in QTYPES.values() if q.adapter)  # export_adapter(outtype=...)


def normalize_qtype(qtype: str) -> str:
    """``"Q4_K-M"`` -> ``"q4_k_m"``; a clear error for a name llama.cpp cannot quantize to."""
    q = qtype.strip().lower().replace("-", "_")
    if q not in QUANTS:
        raise EdgetuneError(f"Unknown quantization type '{qtype}'.", fix=f"use one of: {', '.join(QUANTS)}")
    return q


def bits_per_weight(name: str) -> float:
    if name == AUTO:  # disk estimate: the whole ladder is on disk while it is measured
        return sum(QTYPES[q].bits for q in LADDER)
    return QTYPES[name].bits
