"""Supported model architectures: one row per HF ``model_type``, read by everything that cares.

The trainer (default LoRA targets), the memory estimate (shape of each target), the GGUF
converter and adapter exporter (llama.cpp architecture, hparams hook, tensor transforms), the
README's table and the export tests' parametrisation all read :data:`ARCHITECTURES`. Adding an
architecture is one row here, plus an hparams hook in ``export/gguf.py`` (:data:`HPARAMS_HOOKS`)
when llama.cpp needs hyperparameters beyond the common ones.

Sources per column: ``model_type`` and the linear layer names from each architecture's HF
``modeling_<arch>.py``; ``gguf_arch`` from gguf-py ``MODEL_ARCH_NAMES``; hooks and transforms from
llama.cpp ``convert_hf_to_gguf.py`` (the class named in ``source``) and ``src/llama-model.cpp``.
This module imports nothing heavy: the CLI and the trainer read it at startup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import UnsupportedError


class Dims(NamedTuple):
    """Per-layer sizes a linear layer's shape is written in (from config.json)."""

    h: int  # hidden_size
    i: int  # intermediate_size
    q: int  # num_attention_heads * head_dim
    kv: int  # num_key_value_heads * head_dim


# name -> (in_features, out_features) of each per-layer linear: the default LoRA targets (all
# attention + MLP projections) and what the memory estimate counts for them.
Linears = dict[str, Callable[[Dims], tuple[int, int]]]

_LLAMA_LINEARS: Linears = {
    "q_proj": lambda d: (d.h, d.q),
    "k_proj": lambda d: (d.h, d.kv),
    "v_proj": lambda d: (d.h, d.kv),
    "o_proj": lambda d: (d.q, d.h),
    "gate_proj": lambda d: (d.h, d.i),
    "up_proj": lambda d: (d.h, d.i),
    "down_proj": lambda d: (d.i, d.h),
}
_PHI3_LINEARS: Linears = {  # modeling_phi3.py: fused qkv and gate_up projections
    "qkv_proj": lambda d: (d.h, d.q + 2 * d.kv),
    "o_proj": lambda d: (d.q, d.h),
    "gate_up_proj": lambda d: (d.h, 2 * d.i),
    "down_proj": lambda d: (d.i, d.h),
}


@dataclass(frozen=True)
class Arch:
    model_type: str  # HF config.model_type
    gguf_arch: str  # llama.cpp architecture name (gguf.MODEL_ARCH_NAMES value)
    linears: Linears  # per-layer linears: default LoRA targets and their shapes (memory estimate)
    note: str = ""  # example models (README table)
    hparams: str = "common"  # key of export.gguf.HPARAMS_HOOKS writing the llama.cpp hyperparameters
    # Tensor transforms. HF stores q/k for "rotate half" RoPE; llama.cpp's LLAMA_ROPE_TYPE_NORM
    # rotates adjacent pairs, so convert_hf_to_gguf.py LlamaModel permutes q_proj/k_proj rows
    # (NEOX-rope archs need nothing).
    permute_qk: bool = False
    # Gemma's RMSNorm computes x * (1 + w); llama.cpp computes x * w, so +1 is folded in.
    norm_plus_one: bool = False
    source: str = ""  # the llama.cpp converter class this row follows
    aliases: tuple[str, ...] = ()  # other HF model_type values that share this row
    # config.json values a released checkpoint has that a from-defaults config lacks; the export
    # tests build their tiny model of this architecture with them.
    tiny_config: dict = field(default_factory=dict)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(self.linears)


ARCHITECTURES: dict[str, Arch] = {
    a.model_type: a
    for a in [
        Arch("llama", "llama", _LLAMA_LINEARS, "Llama 2/3, SmolLM/SmolLM2, TinyLlama",
             permute_qk=True, source="convert_hf_to_gguf.py LlamaModel"),
        Arch("mistral", "llama", _LLAMA_LINEARS, "Mistral 7B",
             permute_qk=True, source="convert_hf_to_gguf.py LlamaModel (MistralForCausalLM)"),
        Arch("qwen2", "qwen2", _LLAMA_LINEARS, "Qwen2, Qwen2.5",
             source="convert_hf_to_gguf.py Qwen2Model (NEOX rope, qkv bias)"),
        Arch("qwen3", "qwen3", _LLAMA_LINEARS, "Qwen3 (dense)",
             source="convert_hf_to_gguf.py Qwen3Model (q/k RMSNorm)"),
        # Gemma: query_pre_attn_scalar = head_dim as in Google's releases (see _check_gemma_attn_scale)
        Arch("gemma2", "gemma2", _LLAMA_LINEARS, "Gemma 2", hparams="gemma2", norm_plus_one=True,
             source="convert_hf_to_gguf.py Gemma2Model", tiny_config={"query_pre_attn_scalar": 16}),
        Arch("gemma3_text", "gemma3", _LLAMA_LINEARS, "Gemma 3 (text)", hparams="gemma3", norm_plus_one=True,
             source="convert_hf_to_gguf.py Gemma3Model", aliases=("gemma3",), tiny_config={"query_pre_attn_scalar": 16}),
        Arch("phi3", "phi3", _PHI3_LINEARS, "Phi-3, Phi-3.5 mini", hparams="phi3",
             source="convert_hf_to_gguf.py Phi3MiniModel (fused qkv / gate_up)", tiny_config={"pad_token_id": 2}),
    ]
}
ALIASES = {alias: a.model_type for a in ARCHITECTURES.values() for alias in a.aliases}


def supported_list() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def get_arch(model_type: str, *, where: str | None = None) -> Arch:
    """The row for ``model_type``; a clear error listing the supported ones otherwise."""
    key = ALIASES.get(model_type, model_type)
    try:
        return ARCHITECTURES[key]
    except KeyError:
        raise UnsupportedError(
            f"Architecture '{model_type}' is not supported.",
            where=where,
            fix=f"use a model of a supported architecture: {supported_list()}",
        ) from None


def arch_of_model_dir(model_dir) -> Arch:
    """Read ``config.json`` of an HF folder and return its architecture row."""
    from pathlib import Path

    from .io import read_json

    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        raise UnsupportedError(
            f"{model_dir} is not a Hugging Face model folder (no config.json).",
            where=str(model_dir),
            fix="pass a folder saved with save_pretrained (config.json, *.safetensors, tokenizer files)",
        )
    cfg = read_json(cfg_path)
    return get_arch(cfg.get("model_type", "?"), where=str(cfg_path))


def readme_table() -> str:
    """The "Supported model architectures" table of README.md (a test keeps the two equal)."""
    lines = ["| HF `model_type` | examples | llama.cpp arch |", "|---|---|---|"]
    lines += [f"| `{a.model_type}` | {a.note} | {a.gguf_arch} |" for a in ARCHITECTURES.values()]
    return "\n".join(lines)
