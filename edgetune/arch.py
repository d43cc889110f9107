"""Supported model architectures: one row per HF ``model_type``.

The table is the single place that says which architectures edgetune trains and exports, and
which linear layers LoRA targets by default (all attention + MLP projections; names from each
architecture's HF modeling file). ``gguf_arch`` is the architecture name llama.cpp uses
(gguf-py ``MODEL_ARCH_NAMES``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedError

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    model_type: str  # HF config.model_type
    gguf_arch: str  # llama.cpp architecture name
    lora_targets: tuple[str, ...]  # default LoRA target module names (all linear layers)
    note: str = ""


ARCHITECTURES: dict[str, Arch] = {
    a.model_type: a
    for a in [
        Arch("llama", "llama", _LLAMA_LIKE, "Llama 2/3, SmolLM/SmolLM2, TinyLlama"),
        Arch("mistral", "llama", _LLAMA_LIKE, "Mistral 7B (llama.cpp runs it as llama)"),
        Arch("qwen2", "qwen2", _LLAMA_LIKE, "Qwen2 / Qwen2.5"),
        Arch("qwen3", "qwen3", _LLAMA_LIKE, "Qwen3 dense"),
        Arch("gemma2", "gemma2", _LLAMA_LIKE, "Gemma 2"),
        Arch("gemma3_text", "gemma3", _LLAMA_LIKE, "Gemma 3 (text)"),
        Arch("phi3", "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "Phi-3 / Phi-3.5 mini"),
    ]
}
# Aliases: HF model_type values that share a row above.
ALIASES = {"gemma3": "gemma3_text"}


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
