"""Supported model architectures: one row per HF ``model_type``, read by everything that cares.

The trainer (default LoRA targets), the memory estimate (shape of each target, tied embeddings),
the GGUF converter, adapter exporter and importance matrix (llama.cpp architecture, tensor names
through :func:`gguf_names`, hparams hook, tensor transforms), the README's table and the export
tests' parametrisation all read :data:`ARCHITECTURES`; :func:`read_config` is the one reader of an
HF folder's ``config.json``. Adding an architecture is one row here (with ``tensor_names`` for
tensors gguf-py's table names differently), plus an hparams hook in ``export/gguf.py``
(:data:`HPARAMS_HOOKS`) when llama.cpp needs hyperparameters beyond the common ones.

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
    # HF tensor names gguf-py's table (gguf.get_tensor_name_map) lacks or names differently for
    # this arch, in gguf-py's own form: HF name without .weight/.bias ("{bid}" = block number) ->
    # gguf.MODEL_TENSOR member name, e.g. {"model.layers.{bid}.attn.wq": "ATTN_Q"}. Read by
    # :func:`gguf_names` before gguf-py's table.
    tensor_names: dict[str, str] = field(default_factory=dict)
    # the HF config class's tie_word_embeddings default (a saved config.json omits default values)
    tied_embeddings: bool = False

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(self.linears)

    def tied(self, cfg: dict) -> bool:
        """Whether the output layer reuses the token embeddings (config.json, else this row's default)."""
        return bool(cfg.get("tie_word_embeddings", self.tied_embeddings))


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
             tied_embeddings=True, source="convert_hf_to_gguf.py Gemma2Model", tiny_config={"query_pre_attn_scalar": 16}),
        Arch("gemma3_text", "gemma3", _LLAMA_LINEARS, "Gemma 3 (text)", hparams="gemma3", norm_plus_one=True,
             tied_embeddings=True, source="convert_hf_to_gguf.py Gemma3Model", aliases=("gemma3",), tiny_config={"query_pre_attn_scalar": 16}),
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


def read_config(model_dir) -> dict:
    """``config.json`` of an HF folder: the one reader, with the one error for a folder without it."""
    from pathlib import Path

    from .io import read_json

    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        raise UnsupportedError(
            f"{model_dir} is not a Hugging Face model folder (no config.json).",
            where=str(model_dir),
            fix="pass a folder saved with save_pretrained (config.json, *.safetensors, tokenizer files)",
        )
    return read_json(cfg_path)


def tied_embeddings(cfg: dict) -> bool:
    """Whether a model's output layer reuses its token embeddings: ``tie_word_embeddings`` of its
    (text) config, else its row's default (False for a type not in the table)."""
    mt = cfg.get("model_type", "?")
    row = ARCHITECTURES.get(ALIASES.get(mt, mt))
    return row.tied(cfg) if row else bool(cfg.get("tie_word_embeddings", False))


def arch_of_config(cfg: dict, model_dir) -> Arch:
    """The row of a config read by :func:`read_config` from ``model_dir`` (errors name its config.json)."""
    from pathlib import Path

    return get_arch(cfg.get("model_type", "?"), where=str(Path(model_dir) / "config.json"))


def arch_of_model_dir(model_dir) -> Arch:
    """Read ``config.json`` of an HF folder and return its architecture row."""
    return arch_of_config(read_config(model_dir), model_dir)


class GGUFNames:
    """HF tensor name -> llama.cpp GGUF tensor name for one model (its row and its config.json).

    gguf-py's table for the row's llama.cpp architecture and block count (the table
    convert_hf_to_gguf.py uses), with the row's own ``tensor_names`` put in front of it. The one
    name lookup of the converter, the adapter exporter and the importance matrix.
    """

    def __init__(self, arch: Arch, cfg: dict):
        import gguf

        self.arch = arch
        self.tied = arch.tied(cfg)
        enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.gguf_arch]
        n_blocks = int(cfg["num_hidden_layers"])
        self._map = gguf.get_tensor_name_map(enum, n_blocks)
        for hf, kind in arch.tensor_names.items():
            tensor = getattr(gguf.MODEL_TENSOR, kind, None)
            if tensor not in gguf.MODEL_TENSORS[enum]:
                raise UnsupportedError(
                    f"Row '{arch.model_type}' maps {hf} to {kind}, which llama.cpp's {arch.gguf_arch} has no tensor of.",
                    where="edgetune/arch.py",
                    fix=f"use a gguf.MODEL_TENSOR name of {arch.gguf_arch} (gguf.MODEL_TENSORS)",
                )
            for bid in range(n_blocks) if "{bid}" in hf else [None]:
                name = gguf.TENSOR_NAMES[tensor].format(bid=bid)
                self._map.mapping[hf.format(bid=bid)] = (tensor, name)

    def __call__(self, hf_name: str) -> str | None:
        """The GGUF name of ``hf_name`` (a tensor, or a module name + ".weight"); None when unknown."""
        return self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def gguf_names(arch: Arch, cfg: dict) -> GGUFNames:
    """The HF -> GGUF tensor-name map of a model of ``arch`` with config ``cfg`` (see :class:`GGUFNames`)."""
    return GGUFNames(arch, cfg)


def readme_table() -> str:
    """The "Supported model architectures" table of README.md (a test keeps the two equal)."""
    lines = ["| HF `model_type` | examples | llama.cpp arch |", "|---|---|---|"]
    lines += [f"| `{a.model_type}` | {a.note} | {a.gguf_arch} |" for a in ARCHITECTURES.values()]
    return "\n".join(lines)
