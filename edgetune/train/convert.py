"""MLX (mlx-lm) adapter -> PEFT adapter, exactly.

No library converts between the two, so this is hand-written glue. The mapping is a table of leaf
names; the maths is a transpose and one scale:

    mlx-lm LoRALinear:  y = x W^T + scale * (x @ lora_a) @ lora_b     lora_a: [in, r], lora_b: [r, out]
    PEFT LoRA Linear:   y = x W^T + (alpha / r) * x A^T B^T           A: [r, in],  B: [out, r]

so A = lora_a^T, B = lora_b^T and alpha = scale * r. DoRA: mlx-lm's magnitude ``m`` [out] rescales
rows by m / ||W + scale * lora_b^T lora_a^T||, which is PEFT's ``lora_magnitude_vector`` with the
same (detached) row norm; it is copied as is. Module paths are the HF names in both (mlx-lm ports
keep them), prefixed by PEFT's ``base_model.model.``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import EdgetuneError
from ..io import atomic_dir

# mlx-lm leaf -> (PEFT leaf, transpose?)   source: mlx_lm/tuner/{lora,dora}.py, peft/tuners/lora/layer.py
LEAF_MAP = {
    "lora_a": ("lora_A.weight", True),
    "lora_b": ("lora_B.weight", True),
    "m": ("lora_magnitude_vector", False),
}


def _load_fp32(path: Path) -> dict:
    import mlx.core as mx
    import numpy as np

    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path)).items()}


def mlx_to_peft(mlx_dir, out_dir, base_model_dir, num_model_layers: int | None = None) -> Path:
    """Convert ``mlx_dir`` (adapter_config.json + adapters.safetensors) into a PEFT folder ``out_dir``."""
    import numpy as np
    from safetensors.numpy import save_file

    mlx_dir, out_dir = Path(mlx_dir), Path(out_dir)
    cfg = json.loads((mlx_dir / "adapter_config.json").read_text())
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise EdgetuneError(f"Cannot convert a '{kind}' MLX adapter to PEFT.", where=str(mlx_dir),
                            fix="only LoRA and DoRA adapters have a PEFT form")
    lp = cfg["lora_parameters"]
    rank, scale = int(lp["rank"]), float(lp["scale"])
    tensors, targets, layers = {}, set(), set()
    for name, w in _load_fp32(mlx_dir / "adapters.safetensors").items():
        prefix, leaf = name.rsplit(".", 1)
        if leaf not in LEAF_MAP:
            raise EdgetuneError(f"Unexpected tensor {name} in the MLX adapter.", where=str(mlx_dir))
        peft_leaf, transpose = LEAF_MAP[leaf]
        tensors[f"base_model.model.{prefix}.{peft_leaf}"] = np.ascontiguousarray(w.T if transpose else w)
        targets.add(prefix.rsplit(".", 1)[-1])
        parts = prefix.split(".")
        if "layers" in parts:
            layers.add(int(parts[parts.index("layers") + 1]))
    n_layers = cfg.get("num_layers")
    transform = sorted(layers) if num_model_layers and len(layers) < num_model_layers else None
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_model_dir).resolve()),
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": float(lp.get("dropout", 0.0)),
        "target_modules": sorted(targets),
        "use_dora": kind == "dora",
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": transform,
        "layers_pattern": "layers" if transform else None,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    # kept out of adapter_config.json: PEFT warns about keys it does not know
    note = {"converted_from": "mlx-lm", "mlx_num_layers": n_layers, "base_quantization": cfg.get("base_quantization")}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2) + "\n")
        (tmp / "edgetune_adapter.json").write_text(json.dumps(note, indent=2) + "\n")
    return out_dir
