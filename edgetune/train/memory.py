"""Memory estimate before loading anything (``edgetune train --dry-run``, ``edgetune plan``).

weights (at the chosen precision) + adapter + its gradients and AdamW moments + activations at
batch x seq (DPO/ORPO: 2 x batch sequences, a chosen and a rejected per pair, and for DPO the
reference pass on top). Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation"):
about 34*h bytes per token per layer in 16-bit (half that counted twice in fp32), plus the
attention scores the CPU/MPS SDPA path materialises (heads * seq^2 per sequence, fp32). Gradient
checkpointing keeps only each layer's input (2*h bytes per token) plus one layer's worth.
It is an estimate (±30%); it exists to warn before a run that cannot fit.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..arch import Dims, arch_of_model_dir

# 4bit: bitsandbytes NF4 with double-quantised scales, or MLX affine 4-bit (group 64, fp16 scale + bias):
# both about 0.56 bytes per weight
_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "4bit": 0.5 + 0.0625}


def _model_shapes(model_dir) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    return {
        "hidden": h,
        "inter": cfg.get("intermediate_size", 4 * h),
        "layers": cfg["num_hidden_layers"],
        "heads": heads,
        "kv_heads": kv,
        "head_dim": hd,
        "vocab": cfg["vocab_size"],
        "tied": cfg.get("tie_word_embeddings", False),
    }


def _linear_shapes(s: dict, arch) -> dict[str, tuple[int, int]]:
    """(in, out) of each per-layer linear of ``arch`` (its row in edgetune.arch) for these sizes."""
    d = Dims(h=s["hidden"], i=s["inter"], q=s["heads"] * s["head_dim"], kv=s["kv_heads"] * s["head_dim"])
    return {name: shape(d) for name, shape in arch.linears.items()}


def estimate_memory(model_dir, cfg, precision: str | None = None) -> dict:
    """Estimated peak memory in GB, by part, and whether it fits in the memory available now."""
    s = _model_shapes(model_dir)
    arch = arch_of_model_dir(model_dir)
    lin = _linear_shapes(s, arch)
    per_layer_linear = sum(i * o for i, o in lin.values())
    embed = s["vocab"] * s["hidden"]
    n_params = s["layers"] * (per_layer_linear + 2 * s["hidden"]) + embed * (1 if s["tied"] else 2) + s["hidden"]
    if precision is None:
        if cfg.method == "qlora":
            precision = "bf16"
        elif cfg.precision != "auto":
            precision = cfg.precision
        else:
            from ..precision import decide

            precision = decide("train", "cpu").dtype
    wprec = "4bit" if cfg.method == "qlora" else precision
    # embeddings and the head stay 16-bit under QLoRA
    weights = (n_params - embed) * _BYTES[wprec] + embed * _BYTES["bf16" if cfg.method == "qlora" else wprec]
    targets = cfg.target_modules or arch.lora_targets
    ad = s["layers"] * sum(cfg.rank * (lin[n][0] + lin[n][1]) + (lin[n][1] if cfg.method == "dora" else 0)
                           for n in targets if n in lin)
    if cfg.method == "full":
        ad = n_params
    adapter = ad * 4.0  # fp32 master
    optimizer = ad * 4.0 * 3  # gradient + two AdamW moments (fp32); paged 8-bit would be less
    # unset max_seq_len (from the data, train/sizing.py) before the data exists: its cap, the most it picks
    seq = cfg.max_seq_len or 2048
    # DPO/ORPO: an example is a pair, two padded sequences (prompt+chosen, prompt+rejected) in one batch
    from .support import PAIRED

    rows = cfg.batch_size * (2 if cfg.objective in PAIRED else 1)
    tokens = rows * seq
    act_b = 2.0 if precision in ("bf16", "fp16") else 4.0
    h, L = s["hidden"], s["layers"]
    attn_scores = rows * s["heads"] * seq**2 * 4.0
    if cfg.gradient_checkpointing or cfg.method == "qlora":
        acts = L * tokens * h * act_b + (tokens * h * 17 * act_b + attn_scores)
    else:
        acts = L * (tokens * h * 17 * act_b + attn_scores)
    # logits only at completion tokens in edgetune's loss; assume up to all tokens, fp32
    logits = tokens * s["vocab"] * 4.0 * 2
    # DPO's reference pass (the adapter disabled, no gradient) runs while the policy's graph is held:
    # one layer's activations at a time plus its own fp32 logits/log-softmax. ORPO has none.
    reference = tokens * h * 17 * act_b + attn_scores + logits if cfg.objective == "dpo" else 0.0
    total = weights + adapter + optimizer + acts + logits + reference
    gb = 1e9
    out = {
        "params_b": round(n_params / 1e9, 4),
        "trainable_params_m": round(ad / 1e6, 3),
        "precision": wprec,
        "weights_gb": round(weights / gb, 3),
        "adapter_gb": round(adapter / gb, 3),
        "optimizer_gb": round(optimizer / gb, 3),
        "activations_gb": round((acts + logits) / gb, 3),
        "reference_pass_gb": round(reference / gb, 3),
        "sequences_per_step": rows * cfg.grad_accum,
        "total_gb": round(total / gb, 3),
    }
    try:
        from ..hardware import memory_gb

        _total, avail = memory_gb()
        out["available_gb"] = round(avail, 2)
        out["fits"] = total / gb < avail * 0.9
    except Exception:  # noqa: BLE001 - psutil missing: no verdict
        out["available_gb"] = None
        out["fits"] = None
    return out
