"""Memory estimate before loading anything (``edgetune train --dry-run``, ``edgetune plan``).

runtime + weights (at the chosen precision) + adapter + its gradients and AdamW moments +
activations at batch x seq (DPO/ORPO: 2 x batch sequences, a chosen and a rejected per pair, and for
DPO the reference pass on top) + the fp32 logits at the scored tokens.

Calibrated on measurements, not on the textbook count. Korthikanti et al. 2022 ("Reducing Activation
Recomputation") give ~34·h bytes per token per layer in 16-bit for a GPT block with a 4h GeLU MLP;
this estimator used that and was 19% low at 1.17B (8.04 GB measured vs 6.49). What it misses, from
peak anonymous memory (``shared/tools/peakmem``) of ``edgetune train`` 3 steps on random-weight
Llama shapes (135M, 1.17B, 3.1B; bf16 and fp32; batch 2-4 x 256-512; see scripts/bench_train_memory.py):

* the SwiGLU MLP keeps ~5.5 tensors of the *intermediate* size per token (gate, up, silu(gate), their
  product, ...), not a GeLU MLP's 4h: at 1.2B-3B shapes (intermediate 2.7-4x hidden) the largest term;
* Llama's RMSNorm computes in fp32 whatever the autocast dtype: ~8 fp32 hidden-size copies per layer;
* LoRA dropout keeps a dropped copy of each adapted linear's input for the backward of A
  (5h + q + i values per token per layer; measured 10.1 kB/token/layer at 135M, = 2 bytes x that);
* the process itself: python + torch + transformers + peft before any weight, ~0.30 GB.

The CPU path's SDPA does not materialise the attention scores (the fit gave them ~0): no seq² term
on CPU; MLX and MPS keep one (fp32, heads x seq²) as before, unmeasured here (no Mac).
Weights in the file's own dtype are mmapped by transformers on CPU: file-backed pages, which the
kernel may drop (``weights_mapped_gb``, part of ``total_gb`` because evicting them thrashes the disk,
excluded from ``anon_gb``). Within ±15% of the measured peak at all three sizes; it is an estimate, and
it exists to refuse a run that cannot fit before the OOM killer does it an hour in.
"""

from __future__ import annotations

from ..arch import Dims, arch_of_model_dir, read_config, tied_embeddings

# 4bit: bitsandbytes NF4 with double-quantised scales, or MLX affine 4-bit (group 64, fp16 scale + bias):
# both about 0.56 bytes per weight
_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "4bit": 0.5 + 0.0625}
RUNTIME = 0.30e9  # python + torch + transformers + peft imported, tokenizer and data loaded (peakmem)
# per token per layer, fitted to the measurements above (bytes = ACT_H*b*h + ACT_I*b*i + NORM_F32*4*h)
ACT_H = 2.0  # hidden-size tensors at the activation dtype (b bytes)
ACT_I = 5.5  # intermediate-size tensors at the activation dtype
NORM_F32 = 8.0  # hidden-size fp32 tensors (RMSNorm's upcast)
# gradient checkpointing: the textbook count is each layer's input (2 bytes per hidden unit in bf16)
# plus one recomputed layer; measured (135M, 1.17B, 3.1B, batch 2 x 256 and 4 x 512) ~26 bytes per
# hidden unit per token per layer stay between the forward and the backward, plus one layer's worth
CKPT_BYTES_PER_H = 26.0
LOGIT_BYTES = 12.0  # per scored token per vocab entry: fp32 logits, their log-softmax, the gradient
# share of a row's tokens that carry loss (completion tokens): 22% on the demo tickets, 60-80% on
# chats with long answers; the estimate runs before the data is read, so a middle value
SCORED = 0.5


def _model_shapes(model_dir) -> dict:
    cfg = read_config(model_dir)
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
        "tied": tied_embeddings(cfg),
        "dtype": {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(
            str(cfg.get("dtype") or cfg.get("torch_dtype") or ""), None),
    }


def count_params(model_dir) -> int:
    """Parameter count of ``model_dir``: from the safetensors headers when the weights are here, else
    from the architecture's shape (a folder with only config.json)."""
    import contextlib

    from ..tensors import count_parameters

    with contextlib.suppress(Exception):
        n = count_parameters(model_dir)
        if n:
            return n
    from ..config import TrainConfig

    return int(estimate_memory(model_dir, TrainConfig(), precision="bf16")["params_b"] * 1e9)


def _linear_shapes(s: dict, arch) -> dict[str, tuple[int, int]]:
    """(in, out) of each per-layer linear of ``arch`` (its row in edgetune.arch) for these sizes."""
    d = Dims(h=s["hidden"], i=s["inter"], q=s["heads"] * s["head_dim"], kv=s["kv_heads"] * s["head_dim"])
    return {name: shape(d) for name, shape in arch.linears.items()}


def _layer_act_bytes(s: dict, b: float, dropout: bool) -> float:
    """Bytes one decoder layer keeps per token for the backward (the fit above)."""
    h, i, q = s["hidden"], s["inter"], s["heads"] * s["head_dim"]
    per = ACT_H * b * h + ACT_I * b * i + NORM_F32 * 4.0 * h
    if dropout:
        per += b * (5 * h + q + i)  # the dropped input copies of the seven adapted linears
    return per


def estimate_memory(model_dir, cfg, precision: str | None = None, device: str = "cpu") -> dict:
    """Estimated peak memory in GB, by part, and whether it fits in the memory available now.

    ``device``: cpu | cuda | mlx | mps, where training runs (weights are mmapped only on CPU)."""
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
    # embeddings and the head stay 16-bit under bitsandbytes QLoRA; mlx-lm's quantize_model quantizes them too
    emb_prec = wprec if (cfg.method != "qlora" or device == "mlx") else "bf16"
    weights = (n_params - embed) * _BYTES[wprec] + embed * _BYTES[emb_prec]
    # transformers mmaps safetensors whose dtype is the one asked for: file-backed pages on CPU
    mapped = weights if (device == "cpu" and cfg.method != "qlora" and s["dtype"] == wprec) else 0.0
    targets = cfg.target_modules or arch.lora_targets
    ad = s["layers"] * sum(cfg.rank * (lin[n][0] + lin[n][1]) + (lin[n][1] if cfg.method == "dora" else 0)
                           for n in targets if n in lin)
    if cfg.method == "full":
        ad = n_params
    adapter = ad * 4.0  # fp32 master
    optimizer = ad * 4.0 * 3  # gradient + two AdamW moments (fp32); paged 8-bit would be less
    # unset max_seq_len (from the data, train/sizing.py) before the data exists: its cap, the most it picks
    # DPO/ORPO: an example is a pair, two padded sequences (prompt+chosen, prompt+rejected) in one batch;
    # GRPO: a prompt is num_generations rows of prompt + sampled completion (train/objectives/)
    from .objectives import get

    objective = get(cfg.objective)
    seq = (cfg.max_seq_len or 2048) + objective.tokens_beyond(cfg)
    rows = cfg.batch_size * objective.rows_per_example(cfg)
    tokens = rows * seq
    act_b = 2.0 if precision in ("bf16", "fp16") else 4.0
    L = s["layers"]
    # CPU SDPA keeps no scores (measured); MLX/MPS: assume the scores of a layer are materialised in fp32
    attn_scores = rows * s["heads"] * seq**2 * 4.0 if device in ("mlx", "mps") else 0.0
    layer = tokens * _layer_act_bytes(s, act_b, cfg.dropout > 0) + attn_scores
    # QLoRA (prepare_model_for_kbit_training) checkpoints too
    if cfg.gradient_checkpointing or (cfg.method == "qlora" and device != "mlx"):
        acts = L * tokens * s["hidden"] * CKPT_BYTES_PER_H + layer
    else:
        acts = L * layer
    # logits only at completion tokens in edgetune's loss
    logits = tokens * SCORED * s["vocab"] * LOGIT_BYTES
    # DPO's reference pass (the adapter disabled, no gradient) runs while the policy's graph is held:
    # one layer's activations at a time plus its own fp32 logits/log-softmax. ORPO has none; GRPO's
    # (beta > 0) runs before the step, no larger.
    reference = layer + logits if objective.has_reference_pass(cfg) else 0.0
    runtime = RUNTIME
    total = runtime + weights + adapter + optimizer + acts + logits + reference
    gb = 1e9
    out = {
        "params_b": round(n_params / 1e9, 4),
        "trainable_params_m": round(ad / 1e6, 3),
        "precision": wprec,
        "runtime_gb": round(runtime / gb, 3),
        "weights_gb": round(weights / gb, 3),
        "weights_mapped_gb": round(mapped / gb, 3),
        "adapter_gb": round(adapter / gb, 3),
        "optimizer_gb": round(optimizer / gb, 3),
        "activations_gb": round((acts + logits) / gb, 3),
        "reference_pass_gb": round(reference / gb, 3),
        "sequences_per_step": rows * cfg.grad_accum,
        "total_gb": round(total / gb, 3),
        "anon_gb": round((total - mapped) / gb, 3),
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
