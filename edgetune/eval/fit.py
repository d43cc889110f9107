"""Which runner a run's base / SFT / tuned rows are evaluated on: one that fits this machine.

The hf runner holds the whole model at the eval dtype (fp32 on a CPU without fast bf16: 4 bytes a
parameter, 32 GB for an 8B model) plus a batch's KV cache. Where that does not fit in the memory
available, the rows run on llama.cpp over a GGUF instead: the run's unquantized export (mmapped:
page cache, not the process's memory) when its file fits in memory, else a q8_0 file (half of f16;
top-1 within a few tenths of a percent of f16 on the models this project measured). The base and
SFT models get GGUFs of their own under RUN/eval/ (streamed conversion, no second model in memory).

``eval.runner`` (``auto`` | ``hf`` | ``gguf``) overrides the choice, and an explicit ``eval.dtype``
asks for the hf runner; the report says which runner each row used and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..hardware import FIT_MARGIN, GB
from ..train.memory import RUNTIME, count_params

PROMPT_TOKENS = 1024  # per generated row: prompt + answer the KV cache holds (a generous eval prompt)


@dataclass
class RowRunner:
    kind: str  # "hf" | "gguf"
    gguf_type: str | None  # the GGUF type the rows use (kind == "gguf")
    reason: str
    hf_bytes: float  # what the hf runner would hold

    def as_dict(self) -> dict:
        return {"runner": self.kind, "gguf_type": self.gguf_type, "reason": self.reason,
                "hf_runner_gb": round(self.hf_bytes / GB, 2)}


def hf_runner_bytes(model_dir, dtype: str, batch: int, params: int | None = None) -> float:
    """Peak memory of the hf runner generating ``batch`` rows: weights at ``dtype`` (fp32/bf16/fp16),
    the KV cache of ``batch`` x :data:`PROMPT_TOKENS`, the last position's logits and the runtime.
    ``params``: the parameter count when the caller has it (else read from the safetensors headers)."""
    from ..train.memory import _model_shapes

    s = _model_shapes(model_dir)
    per = 4.0 if dtype in ("fp32", "float32") else 2.0
    kv = 2.0 * s["layers"] * s["kv_heads"] * s["head_dim"] * batch * PROMPT_TOKENS * per
    params = params if params is not None else count_params(Path(model_dir))
    return RUNTIME + params * per + kv + batch * s["vocab"] * 4.0 * 2


def choose(cfg, model_dir, available_bytes: float | None = None) -> RowRunner:
    """The runner for the base/tuned rows of run config ``cfg`` whose base model is ``model_dir``."""
    from ..precision import decide

    ev = cfg.eval
    dec = decide("generate", "cpu", ev.dtype)
    params = count_params(Path(model_dir))
    hf = hf_runner_bytes(model_dir, dec.dtype, ev.batch_size or dec.batch_size or 1, params)
    if ev.runner == "hf":
        return RowRunner("hf", None, "eval.runner: hf", hf)
    if ev.runner == "auto" and ev.dtype != "auto":
        return RowRunner("hf", None, f"eval.dtype: {ev.dtype} asks for the hf runner", hf)
    if available_bytes is None:
        from ..hardware import memory_gb

        available_bytes = memory_gb()[1] * GB
    limit = available_bytes * FIT_MARGIN
    if ev.runner == "auto" and hf <= limit:
        return RowRunner("hf", None, f"hf runner ({dec.dtype}) needs ~{hf / GB:.1f} GB of {limit / GB:.1f} GB usable", hf)
    from ..qtypes import bits_per_weight

    outtype = cfg.export.outtype
    gtype = next((t for t in (outtype, "q8_0") if params * bits_per_weight(t) / 8 <= limit), "q8_0")
    why = ("eval.runner: gguf" if ev.runner == "gguf" else
           f"the hf runner ({dec.dtype}) would need ~{hf / GB:.1f} GB, {limit / GB:.1f} GB usable")
    return RowRunner("gguf", gtype, f"{why}: base/tuned rows on llama.cpp over the {gtype} GGUF (mmapped)", hf)
