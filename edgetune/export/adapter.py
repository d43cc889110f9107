"""Write a LoRA adapter as a GGUF LoRA adapter that llama.cpp loads over the base GGUF.

llama.cpp's adapter format (llama-adapter.cpp; written by convert_lora_to_gguf.py): a GGUF with
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and for every adapted
weight ``<gguf weight name>.lora_a`` (r × in) and ``.lora_b`` (out × r). llama.cpp applies
``W x + (alpha / r) · B A x``. The same per-architecture layout changes as the full conversion apply
(llama's q/k row permutation acts on B's rows). DoRA has no llama.cpp adapter form: fuse it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..arch import gguf_names
from ..errors import UnsupportedError
from ..fuse import load_adapter
from ..io import atomic_path
from ..qtypes import ADAPTER_OUTTYPES
from .gguf import gguf_arch_for, transform_tensor


def export_adapter(base_dir, adapter_dir, out_path, *, outtype: str = "f16") -> Path:
    """Convert ``adapter_dir`` (PEFT or mlx-lm LoRA) for base ``base_dir`` into a GGUF adapter."""
    import gguf

    base_dir, out_path = Path(base_dir), Path(out_path)
    cfg, arch = gguf_arch_for(base_dir)
    ad = load_adapter(adapter_dir)
    if ad.dora:
        raise UnsupportedError(
            "DoRA adapters cannot be written as llama.cpp GGUF adapters (llama.cpp applies plain LoRA only).",
            where=str(adapter_dir),
            fix="use 'edgetune fuse' and export the fused model, or train with method: lora",
        )
    if ad.replaced:
        raise UnsupportedError(
            f"The adapter replaces whole tensors ({', '.join(sorted(ad.replaced)[:3])}), which a GGUF adapter cannot carry.",
            where=str(adapter_dir),
            fix="use 'edgetune fuse' and export the fused model",
        )
    if outtype not in ADAPTER_OUTTYPES:
        raise UnsupportedError(f"Adapter type '{outtype}' is not supported.", fix=f"use one of: {', '.join(ADAPTER_OUTTYPES)}")
    names = gguf_names(arch, cfg)

    # llama.cpp scale = alpha / rank (rank read from each lora_b). One alpha for the file: when the
    # adapter's scale*rank is not the same for every layer (rank_pattern / alpha_pattern), the
    # per-layer scale is folded into B and alpha is written as 0 (= scale 1 in llama.cpp).
    products = {round(layer.scale * layer.A.shape[0], 6) for layer in ad.layers.values()}
    fold = len(products) != 1
    alpha = 0.0 if fold else products.pop()
    dt = np.float16 if outtype == "f16" else np.float32

    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, arch.gguf_arch)
        try:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
            w.add_name(f"{base_dir.name} LoRA")
            for module in sorted(ad.layers, key=_layer_sort_key):
                layer = ad.layers[module]
                gname = names(module + ".weight")
                if gname is None:
                    raise UnsupportedError(f"Adapter layer {module} has no GGUF name for {arch.gguf_arch}.", where=str(adapter_dir))
                b = layer.B * np.float32(layer.scale) if fold else layer.B
                b = transform_tensor(arch, cfg, gname, b)
                w.add_tensor(gname + ".lora_a", np.ascontiguousarray(layer.A, dtype=dt))
                w.add_tensor(gname + ".lora_b", np.ascontiguousarray(b, dtype=dt))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return out_path


def _layer_sort_key(module: str):
    import re

    m = re.search(r"layers\.(\d+)\.", module)
    return (int(m.group(1)) if m else -1, module)
