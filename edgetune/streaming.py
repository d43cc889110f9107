"""Reference forward passes that never hold the whole model: one decoder block at a time.

(Work in progress: the streamed forward lands in this module. ``estimate_peak`` is its memory model,
read by ``edgetune plan``.)
"""

from __future__ import annotations

RUNTIME_BYTES = 450e6  # torch + transformers + tokenizer imported, before any weight (measured, see bench_scale)
HEAD_CHUNK_ROWS = 8192  # output-layer rows converted to fp32 at a time


def estimate_peak(model_dir, *, tokens: int, logit_positions: int = 0) -> dict:
    """Estimated peak anonymous memory (bytes, by part) of a streamed fp32 pass over ``tokens``
    tokens that keeps logits at ``logit_positions`` positions."""
    from .train.memory import _linear_shapes, _model_shapes
    from .arch import arch_of_model_dir

    s = _model_shapes(model_dir)
    lin = _linear_shapes(s, arch_of_model_dir(model_dir))
    block = (sum(i * o for i, o in lin.values()) + 2 * s["hidden"]) * 4.0
    parts = {
        "runtime": RUNTIME_BYTES,
        "block": block * 1.5,  # the fp32 block plus its bf16 bytes while converting
        "head_chunk": HEAD_CHUNK_ROWS * s["hidden"] * 4.0 * 1.5,
        "activations": tokens * (s["hidden"] * 4.0 * 3 + s["inter"] * 4.0 * 3),
        "logits": logit_positions * s["vocab"] * 4.0,
    }
    parts["total"] = sum(parts.values())
    return parts
