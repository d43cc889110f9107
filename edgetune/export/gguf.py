"""Hugging Face folder -> GGUF, with the ``gguf`` library, streaming one tensor at a time.

What is ours and why: gguf-py gives the writer, the tensor-name tables (read through
:func:`edgetune.arch.gguf_names`, the one name map), the special-token / merges / chat-template
reader (``gguf.SpecialVocab``) and the reference quantizers; what it does not ship is the per-
architecture glue (which hyperparameters go where, which weights llama.cpp expects in a different
layout). That glue is a row of ``edgetune.arch.ARCHITECTURES`` per HF ``model_type`` (naming the
llama.cpp source it follows) plus, where the format needs code, an hparams hook in
:data:`HPARAMS_HOOKS` below. The writer is driven in two passes (tensor infos
first, then data) so only one tensor is ever in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..arch import ARCHITECTURES, Arch, arch_of_config, gguf_names, read_config
from ..errors import EdgetuneError, UnsupportedError
from ..io import atomic_path
from ..qtypes import OUTTYPES, QTYPES
from ..tensors import SafetensorsReader, f32_to_bf16_bits, to_float32
from .gguf_vocab import PRE_TOKENIZERS, add_tokenizer, gguf_model_name  # noqa: F401  (PRE_TOKENIZERS: re-exported)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Per-architecture facts. Sources: llama.cpp src/llama-model.cpp (graph + hparams it reads) and
# convert_hf_to_gguf.py (LlamaModel, Qwen2Model, Qwen3Model, Gemma2Model, Gemma3Model,
# Phi3MiniModel), HF transformers modeling_<arch>.py (what the HF weights mean).
# ---------------------------------------------------------------------------------------------


def _rope_params(cfg: dict) -> dict:
    """transformers 5 nests rope settings in ``rope_parameters`` (per layer type for Gemma 3)."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "full_attention" in rp:  # Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}
        return rp["full_attention"] or {}
    return rp


def _rope_theta(cfg: dict, default: float = 10000.0) -> float:
    return float(cfg.get("rope_theta") or _rope_params(cfg).get("rope_theta") or default)


def _head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _common_hparams(cfg: dict, w, *, rope_default: float = 10000.0) -> None:
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(_rope_theta(cfg, rope_default))
    hd = _head_dim(cfg)
    if hd != cfg["hidden_size"] // cfg["num_attention_heads"]:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_dimension_count(int(hd * float(cfg.get("partial_rotary_factor", 1.0))))
    _rope_scaling(cfg, w)


def _rope_scaling(cfg: dict, w) -> None:
    import gguf

    rp = _rope_params(cfg)
    kind = rp.get("rope_type") or rp.get("type") or "default"
    if kind == "default":
        return
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
        return
    if kind == "llama3":
        return  # written as the rope_freqs tensor (see _llama3_rope_freqs)
    raise UnsupportedError(
        f"RoPE scaling type '{kind}' is not supported by the GGUF exporter yet.",
        fix="use a model without rope_scaling, or with 'linear' / 'llama3' scaling",
    )


def _llama3_rope_freqs(cfg: dict) -> np.ndarray | None:
    """Llama 3.1+ frequency factors, stored as ``rope_freqs.weight`` (llama.cpp reads them there)."""
    rp = _rope_params(cfg)
    if (rp.get("rope_type") or rp.get("type")) != "llama3":
        return None
    base = _rope_theta(cfg)
    dim = _head_dim(cfg)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _check_gemma_attn_scale(cfg: dict) -> None:
    """llama.cpp scales Gemma queries by 1/sqrt(head_dim) (hidden/heads for 27B), not by config.

    HF reads ``query_pre_attn_scalar``; a config where it is neither value would export a model
    that computes something else, so refuse it (llama-model.cpp, LLM_ARCH_GEMMA2/3 f_attention_scale).
    """
    q = cfg.get("query_pre_attn_scalar")
    hd = _head_dim(cfg)
    if q is not None and int(q) not in (hd, cfg["hidden_size"] // cfg["num_attention_heads"]):
        raise UnsupportedError(
            f"query_pre_attn_scalar={q} differs from head_dim={hd}; llama.cpp cannot express it.",
            fix="Gemma checkpoints released by Google satisfy this; check the model's config.json",
        )


def _gemma2_hparams(cfg: dict, w) -> None:
    _check_gemma_attn_scale(cfg)
    _common_hparams(cfg, w)
    if cfg.get("attn_logit_softcapping") is not None:
        w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
    if cfg.get("final_logit_softcapping") is not None:
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if cfg.get("sliding_window"):
        w.add_sliding_window(int(cfg["sliding_window"]))


def _gemma3_hparams(cfg: dict, w) -> None:
    _check_gemma_attn_scale(cfg)
    _common_hparams(cfg, w, rope_default=1_000_000.0)
    rp = cfg.get("rope_parameters") or {}
    local = cfg.get("rope_local_base_freq") or (rp.get("sliding_attention") or {}).get("rope_theta")
    if local:
        w.add_rope_freq_base_swa(float(local))
    if cfg.get("sliding_window"):
        w.add_sliding_window(int(cfg["sliding_window"]))
    layer_types = cfg.get("layer_types")
    if layer_types:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if cfg.get("final_logit_softcapping") is not None:
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))


def _phi3_hparams(cfg: dict, w) -> None:
    _common_hparams(cfg, w)
    rp = cfg.get("rope_scaling") or {}
    if rp and (rp.get("type") or rp.get("rope_type")) not in (None, "default"):
        raise UnsupportedError("Phi-3 long-context RoPE (longrope/su) is not supported by the GGUF exporter yet.")
    w.add_sliding_window(int(cfg.get("sliding_window") or 0))


# Hooks named by the ``hparams`` column of edgetune.arch.ARCHITECTURES.
HPARAMS_HOOKS: dict[str, Callable[[dict, object], None]] = {
    "common": _common_hparams,
    "gemma2": _gemma2_hparams,
    "gemma3": _gemma3_hparams,
    "phi3": _phi3_hparams,
}


def supported() -> list[str]:
    return sorted(ARCHITECTURES)


def gguf_arch_for(model_dir: str | Path) -> tuple[dict, Arch]:
    """``config.json`` (:func:`edgetune.arch.read_config`) with its table row; refuse what cannot be exported up front."""
    cfg = read_config(model_dir)
    cfg_path = Path(model_dir) / "config.json"
    if "text_config" in cfg and "num_hidden_layers" not in cfg:  # multimodal wrapper (e.g. gemma3)
        raise UnsupportedError(
            f"{cfg.get('model_type')} is a multimodal checkpoint; only text-only models are exported.",
            where=str(cfg_path),
            fix=f"export a text-only model of a supported architecture: {', '.join(supported())}",
        )
    arch = arch_of_config(cfg, model_dir)
    if cfg.get("quantization_config"):
        raise UnsupportedError(
            f"{model_dir} holds quantized weights ({cfg['quantization_config'].get('quant_method', '?')}).",
            where=str(cfg_path),
            fix="export the bf16/fp16 model (fuse a QLoRA adapter into the original bf16 base first)",
        )
    return cfg, arch


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp interleaved pairs (a row reorder; works on any dtype)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Plan:
    hf_name: str | None  # None: generated tensor (e.g. rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    data: np.ndarray | None = None


def _tensor_qtype(outtype: str, shape: tuple[int, ...]):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32  # norms/biases stay f32 as in every llama.cpp conversion
    qtype = Q[QTYPES[outtype].ggml]  # the ggml column of edgetune.qtypes
    block = gguf.GGML_QUANT_SIZES[qtype][0]  # values per block: 1 for float types, 32 for q8_0
    return qtype if shape[-1] % block == 0 else Q.F16


def _nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * size


def transform_tensor(arch: Arch, cfg: dict, gguf_name: str, arr: np.ndarray) -> np.ndarray:
    """Per-arch layout change of one HF tensor (storage dtype in, same dtype out), chosen by its
    GGUF name (:func:`edgetune.arch.gguf_names`) so it holds whatever the checkpoint calls it."""
    if arch.permute_qk:
        n_head = int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_head)
        if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
            arr = _permute_rows(arr, n_head)
        elif gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
            arr = _permute_rows(arr, n_kv)
    return arr


def _encode(arr_f32_or_raw: np.ndarray, st_dtype: str, qtype, norm_plus_one: bool) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.BF16 and st_dtype == "BF16" and not norm_plus_one:
        return np.ascontiguousarray(arr_f32_or_raw)  # bit copy, no rounding
    # Convert in row blocks so the float32 copy never exceeds a few MB (peak ~ in + out tensor).
    src = arr_f32_or_raw
    rows = src.reshape(-1, src.shape[-1]) if src.ndim > 1 else src.reshape(1, -1)
    if qtype == Q.F32:
        out = np.empty(rows.shape, dtype=np.float32)
    elif qtype == Q.F16:
        out = np.empty(rows.shape, dtype=np.float16)
    elif qtype == Q.BF16:
        out = np.empty(rows.shape, dtype=np.uint16)
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        out = np.empty((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    step = max(1, (4 << 20) // max(1, rows.shape[1] * 4))
    for i in range(0, rows.shape[0], step):
        blk = to_float32(rows[i : i + step], st_dtype)
        if norm_plus_one:
            blk = blk + 1.0
        if qtype == Q.F32:
            out[i : i + step] = blk
        elif qtype == Q.F16:
            out[i : i + step] = blk.astype(np.float16)
        elif qtype == Q.BF16:
            out[i : i + step] = f32_to_bf16_bits(blk)
        else:
            out[i : i + step] = gguf.quants.quantize(blk, qtype)
    if src.ndim > 1:
        return out.reshape(*src.shape[:-1], out.shape[-1])
    return out.reshape(-1)


def _is_norm(gguf_name: str) -> bool:
    return gguf_name.endswith("norm.weight")


def convert(
    model_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    verify: bool = True,
    *,
    show_progress: bool = True,
):
    """Convert an HF folder to a GGUF file; verify it against the HF model unless ``verify=False``.

    Returns the output path. With ``verify=True`` the verification report is attached as
    ``convert.last_report`` and a disagreeing f32/f16/bf16 export raises :class:`EdgetuneError`.
    """
    import gguf

    model_dir = Path(model_dir)
    out_path = Path(out_path)
    if outtype not in OUTTYPES:
        raise EdgetuneError(f"Unknown GGUF type '{outtype}'.", fix=f"use one of: {', '.join(OUTTYPES)}")
    cfg, arch = gguf_arch_for(model_dir)
    reader = SafetensorsReader(model_dir)
    names = gguf_names(arch, cfg)

    # Pass 1: plan every tensor (name, shape, type) so the header can be written before any data.
    plans: list[_Plan] = []
    for hf_name, ref in reader.refs.items():
        if hf_name.endswith(("rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")):
            continue
        gguf_name = names(hf_name)
        if gguf_name is None:
            raise UnsupportedError(
                f"Tensor '{hf_name}' has no GGUF name for architecture {arch.gguf_arch}.",
                where=str(ref.file),
                fix="this checkpoint has layers the exporter does not know; please report it",
            )
        plans.append(_Plan(hf_name, gguf_name, ref.shape, _tensor_qtype(outtype, ref.shape)))
    embed = next((reader.refs[p.hf_name] for p in plans if p.gguf_name == "token_embd.weight"), None)
    if names.tied and embed is not None:  # llama.cpp falls back to token_embd when output.weight is absent
        plans = [p for p in plans if p.gguf_name != "output.weight"]
    if (freqs := _llama3_rope_freqs(cfg)) is not None:
        plans.append(_Plan(None, "rope_freqs.weight", freqs.shape, gguf.GGMLQuantizationType.F32, freqs))

    n_vocab = int(embed.shape[0]) if embed is not None else int(cfg["vocab_size"])

    from ..hardware import require_free_disk

    n_values = sum(math.prod(p.shape) for p in plans)
    require_free_disk(out_path, n_values * QTYPES[outtype].bits / 8, f"the {outtype} GGUF",
                      "free space there, write elsewhere (-o), or choose a smaller --outtype (q8_0 is about half of f16)")
    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, arch.gguf_arch)
        try:
            w.add_name(gguf_model_name(model_dir))
            w.add_type(gguf.GGUFType.MODEL)
            HPARAMS_HOOKS[arch.hparams](cfg, w)
            w.add_vocab_size(n_vocab)
            w.add_file_type(getattr(gguf.LlamaFileType, QTYPES[outtype].ftype))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_tokenizer(w, model_dir, n_vocab)
            for p in plans:
                w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype), raw_dtype=p.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            # Pass 2: stream the data, one tensor in memory at a time.
            from ..console import progress

            with progress(transient=True) as bar:
                task = bar.add_task(f"GGUF {outtype}", total=len(plans), visible=show_progress)
                for p in plans:
                    if p.hf_name is None:
                        data = p.data
                    else:
                        raw = transform_tensor(arch, cfg, p.gguf_name, reader.load(p.hf_name))
                        plus = arch.norm_plus_one and _is_norm(p.gguf_name)
                        data = _encode(raw, reader.refs[p.hf_name].dtype, p.qtype, plus)
                        del raw
                    w.write_tensor_data(data)
                    del data
                    bar.advance(task)
        finally:
            w.close()
        convert.last_report = None
        if verify:  # before the rename: a GGUF that fails verification never gets the final name
            from .verify import verify_gguf

            report = verify_gguf(model_dir, tmp, outtype=outtype)
            report.gguf = str(out_path)
            convert.last_report = report
            report.raise_if_failed(out_path)
    return out_path


convert.last_report = None
